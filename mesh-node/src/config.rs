//! The edge's config file, parsed with unknown keys rejected and validated into [`Config`]
//! before any port is bound.

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
}

fn default_grace_ms() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpsSection {
    listen: SocketAddr,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    /// Host name, exact or `*.example.com`; `*` matches any host.
    host: String,
    #[serde(default = "default_prefix")]
    path_prefix: String,
    service: String,
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
}

impl Default for TunnelSection {
    fn default() -> Self {
        Self {
            connect_timeout_ms: default_connect_ms(),
            reconnect_min_ms: default_backoff_min(),
            reconnect_max_ms: default_backoff_max(),
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
    pub admin: Option<SocketAddr>,
    /// Logging.
    pub log: LogSection,
    /// HTTPS listener and certificates.
    pub https: Option<Https>,
    /// Plain-HTTP listener that redirects to HTTPS.
    pub http_redirect: Option<SocketAddr>,
    /// Host/path routes to connector services.
    pub routes: Vec<Route>,
    /// Raw TCP listeners.
    pub tcp: Vec<TcpForward>,
    /// The connectors to tunnel to (members with role `connector` and an address).
    pub connectors: Vec<Member>,
    /// Tunnel timing.
    pub tunnel: Tunnel,
    /// Drain time on SIGTERM.
    pub shutdown_grace: Duration,
    /// Runtime worker threads (`node.worker_threads`); `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Path probing, route selection and gossip.
    pub routing: RoutingConfig,
    /// Membership (SWIM) timing.
    pub membership: SwimConfig,
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
    if connectors.is_empty() {
        return Err(v.invalid(
            "mesh.members",
            "no member has role = \"connector\"; the edge needs one to tunnel to",
        ));
    }
    for c in &connectors {
        let Some(addr) = &c.address else {
            return Err(v.invalid(
                "mesh.members",
                format!(
                    "connector {:?} needs an `address` (host:port) for edges to dial",
                    c.name
                ),
            ));
        };
        skylane_shared::resolve::split_host_port(addr)
            .map_err(|e| v.invalid("mesh.members", format!("connector {:?}: {e}", c.name)))?;
    }
    let https = match file.https {
        None => None,
        Some(h) => {
            if h.certificates.is_empty() {
                return Err(v.invalid("https.certificates", "at least one certificate is needed"));
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
    let mut routes = Vec::new();
    for (i, r) in file.routes.into_iter().enumerate() {
        if !r.path_prefix.starts_with('/') {
            return Err(v.invalid(format!("routes[{i}].path_prefix"), "must start with '/'"));
        }
        if r.service.is_empty() {
            return Err(v.invalid(format!("routes[{i}].service"), "must not be empty"));
        }
        routes.push(Route {
            host: r.host.to_ascii_lowercase(),
            path_prefix: r.path_prefix,
            service: r.service,
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
        Some(n) => Some(v.in_range("node.worker_threads", n, 1..=1024)? as usize),
        None => None,
    };
    v.mesh_sections(&file.routing, &file.membership)?;
    Ok(Config {
        identity,
        listen: file.node.listen,
        admin: file.admin.map(|a| a.listen),
        log: file.log,
        https,
        http_redirect: file.http.map(|h| h.listen),
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
        },
        shutdown_grace: Duration::from_millis(file.shutdown_grace_ms),
        worker_threads,
        routing: file.routing,
        membership: file.membership,
    })
}
