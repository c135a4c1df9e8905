//! The edge's config file, parsed with unknown keys rejected and validated into [`Config`]
//! before any port is bound. The edge-policy sections live in [`policy`].

pub mod acme;
pub mod cache;
pub mod policy;
pub mod wireguard;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use skylane_shared::config::{
    AdminSection, ConfigError, Identity, LogSection, MeshSection, NodeSection, Validator,
    load_identity, load_toml,
};
use skylane_shared::membership::{Member, Role};
use skylane_shared::routing::RoutingConfig;
use skylane_shared::swim::SwimConfig;

pub use policy::{ClientAddress, Limits, RateKey, RateLimit, Timeouts, UnderAttack};
use policy::{
    ClientAddressSection, LimitsSection, RateLimitSection, TimeoutsSection, UnderAttackSection,
};
pub use skylane_shared::config::{Admin, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: NodeSection,
    #[serde(default)]
    mesh: MeshSection,
    #[serde(default)]
    routing: RoutingConfig,
    #[serde(default)]
    membership: SwimConfig,
    admin: Option<AdminSection>,
    #[serde(default)]
    log: LogSection,
    https: Option<HttpsSection>,
    http: Option<HttpSection>,
    #[serde(default)]
    routes: Vec<RouteSection>,
    #[serde(default)]
    tcp: Vec<TcpSection>,
    #[serde(default)]
    tunnel: TunnelSection,
    #[serde(default = "default_grace_ms")]
    shutdown_grace_ms: u64,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    timeouts: TimeoutsSection,
    #[serde(default)]
    client_address: ClientAddressSection,
    #[serde(default)]
    rate_limits: Vec<RateLimitSection>,
    under_attack: Option<UnderAttackSection>,
    cache: Option<cache::CacheSection>,
    acme: Option<acme::AcmeSection>,
    wireguard: Option<wireguard::WireguardSection>,
}

fn default_grace_ms() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpsSection {
    listen: SocketAddr,
    /// Certificate files; may be empty when `[acme]` provides the certificates.
    #[serde(default)]
    certificates: Vec<CertificateSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateSection {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// SNI names this certificate answers (`*.example.com` allowed). The first
    /// certificate also answers clients that send no or an unknown name.
    #[serde(default)]
    server_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: SocketAddr,
    /// The HTTPS port the redirect sends browsers to, when users reach the edge through a
    /// port mapping (a load balancer's 443 in front of the edge's 8443). Default: the
    /// HTTPS listener's own port.
    https_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    /// Host name, exact or `*.example.com`; `*` matches any host.
    host: String,
    #[serde(default = "default_prefix")]
    path_prefix: String,
    service: String,
    /// An API: never challenged in "under attack" mode (API clients cannot run the
    /// challenge), but rate limits still apply.
    #[serde(default)]
    api: bool,
    /// Names of `[[rate_limits]]` zones every request on this route counts against.
    #[serde(default)]
    rate_limits: Vec<String>,
    /// Largest request body, bytes; larger gets 413. Default 100 MiB.
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    /// Challenge every browser on this route, whether or not its host is switched on.
    #[serde(default)]
    under_attack: bool,
}

fn default_max_body() -> u64 {
    100 * 1024 * 1024
}

fn default_prefix() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSection {
    listen: SocketAddr,
    service: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelSection {
    #[serde(default = "default_connect_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_backoff_min")]
    reconnect_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    reconnect_max_ms: u64,
    /// Flows one QUIC connection carries before the pool opens another. Default 8000.
    #[serde(default = "default_streams_per_connection")]
    streams_per_connection: u64,
}

fn default_streams_per_connection() -> u64 {
    crate::tunnel::STREAMS_PER_CONNECTION as u64
}

impl Default for TunnelSection {
    fn default() -> Self {
        Self {
            connect_timeout_ms: default_connect_ms(),
            reconnect_min_ms: default_backoff_min(),
            reconnect_max_ms: default_backoff_max(),
            streams_per_connection: default_streams_per_connection(),
        }
    }
}

fn default_connect_ms() -> u64 {
    3_000
}
fn default_backoff_min() -> u64 {
    100
}
fn default_backoff_max() -> u64 {
    5_000
}

/// A validated edge config.
#[derive(Debug)]
pub struct Config {
    /// Node key, own entry and member list.
    pub identity: Identity,
    /// UDP address of the mesh socket.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: Option<Admin>,
    /// Logging.
    pub log: LogSection,
    /// HTTPS listener and certificates.
    pub https: Option<Https>,
    /// Plain-HTTP listener that redirects to HTTPS.
    pub http_redirect: Option<SocketAddr>,
    /// The port in the redirects' `Location`, if not the HTTPS listener's.
    pub redirect_https_port: Option<u16>,
    /// Host/path routes to connector services.
    pub routes: Vec<Route>,
    /// Raw TCP listeners.
    pub tcp: Vec<TcpForward>,
    /// The connectors to tunnel to (members with role `connector`; one without an address
    /// dials out, and is dialled back at the address its frames come from).
    pub connectors: Vec<Member>,
    /// Tunnel timing.
    pub tunnel: Tunnel,
    /// Drain time on SIGTERM.
    pub shutdown_grace: Duration,
    /// Shards (`node.worker_threads`): threads that serve connections; `None`: one per CPU
    /// (see `skylane_shared::shards`).
    pub worker_threads: Option<usize>,
    /// Path probing, route selection and gossip.
    pub routing: RoutingConfig,
    /// Membership (SWIM) timing.
    pub membership: SwimConfig,
    /// Connection and request limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Who the client is.
    pub client_address: ClientAddress,
    /// Rate-limit zones, in config order; routes refer to them by index.
    pub rate_limits: Vec<RateLimit>,
    /// The browser challenge.
    pub under_attack: UnderAttack,
    /// The HTTP cache, if on.
    pub cache: Option<cache::CacheConfig>,
    /// Certificates from an ACME CA, if configured.
    pub acme: Option<acme::Acme>,
    /// WireGuard endpoints and the connectors behind them.
    pub wireguard: Option<wireguard::Wireguard>,
}

/// The HTTPS listener.
#[derive(Clone, Debug)]
pub struct Https {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Certificates; the first is the default.
    pub certificates: Vec<Certificate>,
}

/// One certificate and the names it answers.
#[derive(Clone, Debug)]
pub struct Certificate {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// SNI names.
    pub server_names: Vec<String>,
}

/// A route from host and path prefix to a service.
#[derive(Clone, Debug)]
pub struct Route {
    /// Lowercase host pattern.
    pub host: String,
    /// Path prefix.
    pub path_prefix: String,
    /// Connector service.
    pub service: String,
    /// Never challenged.
    pub api: bool,
    /// Indices into [`Config::rate_limits`].
    pub rate_limits: Vec<usize>,
    /// Largest request body.
    pub max_body_bytes: u64,
    /// Always challenged.
    pub under_attack: bool,
}

/// A raw TCP listener mapped to a service.
#[derive(Clone, Debug)]
pub struct TcpForward {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connector service.
    pub service: String,
}

/// Tunnel timing.
#[derive(Clone, Debug)]
pub struct Tunnel {
    /// Handshake timeout.
    pub connect_timeout: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Flows per QUIC connection before the pool grows.
    pub streams_per_connection: usize,
}

/// Loads and validates an edge config.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file: File = load_toml(path)?;
    let v = Validator::new(path);
    let identity = load_identity(&v, &file.node, &file.mesh, Role::Edge)?;
    let connectors: Vec<Member> = identity
        .members
        .iter()
        .filter(|m| m.role == Role::Connector)
        .cloned()
        .collect();
    let mesh_names: Vec<String> = connectors.iter().map(|m| m.name.clone()).collect();
    let other_edges: Vec<String> = identity
        .members
        .iter()
        .filter(|m| m.role == Role::Edge && m.id != identity.key.id())
        .map(|m| m.name.clone())
        .collect();
    let wireguard = wireguard::validate(
        &v,
        file.wireguard.as_ref(),
        &identity.key,
        &mesh_names,
        &other_edges,
    )?;
    if connectors.is_empty()
        && wireguard
            .as_ref()
            .is_none_or(|w| w.connectors.is_empty() && w.services.is_empty())
    {
        return Err(v.invalid(
            "mesh.members",
            "no member has role = \"connector\" (and no [[wireguard.connectors]] or [wireguard.services]); the edge needs one to tunnel to",
        ));
    }

    // A connector with no `address` dials out: edges learn where it is from its frames.
    for c in &connectors {
        if let Some(addr) = &c.address {
            skylane_shared::resolve::split_host_port(addr)
                .map_err(|e| v.invalid("mesh.members", format!("connector {:?}: {e}", c.name)))?;
        }
    }
    let https = match file.https {
        None => None,
        Some(h) => {
            if h.certificates.is_empty() && file.acme.is_none() {
                return Err(v.invalid(
                    "https.certificates",
                    "at least one certificate is needed (or an [acme] section to get them)",
                ));
            }
            let certificates = h
                .certificates
                .into_iter()
                .map(|c| Certificate {
                    cert_file: v.relative(&c.cert_file),
                    key_file: v.relative(&c.key_file),
                    server_names: c
                        .server_names
                        .iter()
                        .map(|n| n.to_ascii_lowercase())
                        .collect(),
                })
                .collect();
            Some(Https {
                listen: h.listen,
                certificates,
            })
        }
    };
    if https.is_none() && file.tcp.is_empty() {
        return Err(v.invalid("https", "nothing to serve: configure [https] or [[tcp]]"));
    }
    if file.http.is_some() && https.is_none() {
        return Err(v.invalid(
            "http",
            "the plain-HTTP listener redirects to HTTPS, so [https] is needed",
        ));
    }
    let acme = acme::validate(&v, file.acme.as_ref(), file.http.is_some(), https.is_some())?;
    if acme.is_some() && https.is_none() {
        return Err(v.invalid(
            "acme",
            "ACME certificates are for the HTTPS listener: configure [https]",
        ));
    }
    let rate_limits = policy::validate_rate_limits(&v, &file.rate_limits)?;
    let under_attack = policy::validate_under_attack(&v, file.under_attack.as_ref())?;
    let mut routes = Vec::new();
    for (i, r) in file.routes.into_iter().enumerate() {
        if !r.path_prefix.starts_with('/') {
            return Err(v.invalid(format!("routes[{i}].path_prefix"), "must start with '/'"));
        }
        if r.service.is_empty() {
            return Err(v.invalid(format!("routes[{i}].service"), "must not be empty"));
        }
        let mut zones = Vec::new();
        for (j, name) in r.rate_limits.iter().enumerate() {
            let index = rate_limits
                .iter()
                .position(|z| &z.name == name)
                .ok_or_else(|| {
                    v.invalid(
                        format!("routes[{i}].rate_limits[{j}]"),
                        format!("no [[rate_limits]] zone is named {name:?}"),
                    )
                })?;
            zones.push(index);
        }
        if r.under_attack && under_attack.secret.is_none() {
            return Err(v.invalid(
                format!("routes[{i}].under_attack"),
                "the challenge needs [under_attack] secret_file",
            ));
        }
        if r.under_attack && r.api {
            return Err(v.invalid(
                format!("routes[{i}].under_attack"),
                "an api route is never challenged; set one of `api` and `under_attack`",
            ));
        }
        routes.push(Route {
            host: r.host.to_ascii_lowercase(),
            path_prefix: r.path_prefix,
            service: r.service,
            api: r.api,
            rate_limits: zones,
            max_body_bytes: v.in_range(
                &format!("routes[{i}].max_body_bytes"),
                r.max_body_bytes,
                0..=u64::MAX,
            )?,
            under_attack: r.under_attack,
        });
    }
    if https.is_some() && routes.is_empty() {
        return Err(v.invalid(
            "routes",
            "HTTPS is on but no [[routes]] send requests anywhere",
        ));
    }
    v.in_range(
        "tunnel.connect_timeout_ms",
        file.tunnel.connect_timeout_ms,
        1..=600_000,
    )?;
    v.in_range(
        "tunnel.reconnect_min_ms",
        file.tunnel.reconnect_min_ms,
        1..=600_000,
    )?;
    v.in_range(
        "tunnel.reconnect_max_ms",
        file.tunnel.reconnect_max_ms,
        file.tunnel.reconnect_min_ms..=3_600_000,
    )?;
    v.in_range("shutdown_grace_ms", file.shutdown_grace_ms, 0..=3_600_000)?;
    let worker_threads = match file.node.worker_threads {
        Some(n) => Some(v.in_range("node.worker_threads", n, 0..=1024)? as usize),
        None => None,
    };
    v.mesh_sections(&file.routing, &file.membership)?;
    Ok(Config {
        identity,
        listen: file.node.listen,
        admin: v.admin(file.admin.as_ref())?,
        log: file.log,
        https,
        http_redirect: file.http.as_ref().map(|h| h.listen),
        redirect_https_port: file.http.as_ref().and_then(|h| h.https_port),
        routes,
        tcp: file
            .tcp
            .into_iter()
            .map(|t| TcpForward {
                listen: t.listen,
                service: t.service,
            })
            .collect(),
        connectors,
        tunnel: Tunnel {
            connect_timeout: Duration::from_millis(file.tunnel.connect_timeout_ms),
            reconnect_min: Duration::from_millis(file.tunnel.reconnect_min_ms),
            reconnect_max: Duration::from_millis(file.tunnel.reconnect_max_ms),
            streams_per_connection: v.in_range(
                "tunnel.streams_per_connection",
                file.tunnel.streams_per_connection,
                1..=u64::from(skylane_shared::quic::MAX_CONCURRENT_STREAMS),
            )? as usize,
        },
        shutdown_grace: Duration::from_millis(file.shutdown_grace_ms),
        worker_threads,
        routing: file.routing,
        membership: file.membership,
        limits: policy::validate_limits(&v, &file.limits)?,
        timeouts: policy::validate_timeouts(&v, &file.timeouts)?,
        client_address: policy::validate_client_address(&v, &file.client_address)?,
        rate_limits,
        under_attack,
        cache: cache::validate(&v, file.cache.as_ref())?,
        acme,
        wireguard,
    })
}
