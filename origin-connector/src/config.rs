//! The connector's config file: parsed with unknown keys rejected, then validated into
//! [`Config`] before anything binds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use skylane_shared::config::{
    AdminSection, ConfigError, Identity, LogSection, MeshSection, NodeSection, Validator,
    load_identity, load_toml,
};
use skylane_shared::membership::Role;
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
    /// How long SIGTERM waits for in-flight streams before closing tunnels.
    #[serde(default = "default_grace_ms")]
    shutdown_grace_ms: u64,
    #[serde(default)]
    services: BTreeMap<String, ServiceSection>,
    wireguard: Option<WireguardSection>,
}

/// `[wireguard]`: flows from edges that reach this connector through a WireGuard endpoint
/// (wg-quick, a firewall, a cloud VPN gateway) in front of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireguardSection {
    /// TCP address on the WireGuard interface that edges open flows to.
    listen: SocketAddr,
    /// Tunnel addresses (the edges' `address` in their peer entry) allowed to open flows.
    allowed_sources: Vec<String>,
    /// Flows taken at once on this listener.
    #[serde(default = "default_wg_flows")]
    max_flows: u64,
}

fn default_wg_flows() -> u64 {
    16_384
}

fn default_grace_ms() -> u64 {
    10_000
}

/// `[services.NAME]`: one origin service (also an edge's `[wireguard.services.NAME]`,
/// which reaches its servers through a WireGuard tunnel).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// `http` (default) or `tcp`.
    #[serde(default)]
    kind: ServiceKind,
    /// Origin servers, `host:port`.
    servers: Vec<String>,
    /// TCP connect timeout to an origin server.
    #[serde(default = "default_connect_ms")]
    connect_timeout_ms: u64,
    /// How long to wait for the origin's response head before answering 504.
    #[serde(default = "default_response_ms")]
    response_timeout_ms: u64,
    /// Idle keep-alive connections kept per origin server.
    #[serde(default = "default_pool")]
    max_idle_per_server: usize,
    /// Flows (requests, websockets, TCP connections) the service carries at once: what the
    /// origin can take. Default 50 000.
    #[serde(default = "default_max_streams")]
    max_concurrent_streams: u64,
    /// How long a flow past that cap waits for room before the edge is told the origin is
    /// overloaded (the user gets 503 with `Retry-After`). Default 1000 ms.
    #[serde(default = "default_queue_ms")]
    queue_timeout_ms: u64,
    health_check: Option<HealthSection>,
}

fn default_max_streams() -> u64 {
    50_000
}
fn default_queue_ms() -> u64 {
    1_000
}

fn default_connect_ms() -> u64 {
    2_000
}
fn default_response_ms() -> u64 {
    30_000
}
fn default_pool() -> usize {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    /// HTTP path to GET (HTTP services); TCP services check that a connection opens.
    #[serde(default = "default_health_path")]
    path: String,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_check_timeout_ms")]
    timeout_ms: u64,
    /// Consecutive successes that make a down server up again.
    #[serde(default = "default_up")]
    healthy_threshold: u32,
    /// Consecutive failures that take a server down.
    #[serde(default = "default_down")]
    unhealthy_threshold: u32,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_interval_ms() -> u64 {
    1_000
}
fn default_check_timeout_ms() -> u64 {
    500
}
fn default_up() -> u32 {
    2
}
fn default_down() -> u32 {
    2
}

/// Whether a service speaks HTTP or raw TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// HTTP/1.1 to the origin, pooled keep-alive connections.
    #[default]
    Http,
    /// Raw TCP, one origin connection per stream.
    Tcp,
}

/// A validated connector config.
#[derive(Debug)]
pub struct Config {
    /// Node key, own entry and member list.
    pub identity: Identity,
    /// UDP address of the mesh socket.
    pub listen: SocketAddr,
    /// Admin listener, if any.
    pub admin: Option<skylane_shared::config::Admin>,
    /// Logging.
    pub log: LogSection,
    /// Drain time on SIGTERM.
    pub shutdown_grace: Duration,
    /// Shards (`node.worker_threads`): threads that serve connections; `None`: one per CPU
    /// (see `skylane_shared::shards`).
    pub worker_threads: Option<usize>,
    /// Path probing, route selection and gossip.
    pub routing: RoutingConfig,
    /// Membership (SWIM) timing.
    pub membership: SwimConfig,
    /// Origin services by name.
    pub services: BTreeMap<String, Service>,
    /// The listener for flows through a WireGuard endpoint, if any.
    pub wireguard: Option<WireguardListener>,
}

/// Where flows through a WireGuard endpoint come in, and from whom.
#[derive(Clone, Debug)]
pub struct WireguardListener {
    /// TCP address on the WireGuard interface.
    pub listen: SocketAddr,
    /// Source networks allowed.
    pub allowed_sources: Vec<ipnet::IpNet>,
    /// Flows at once.
    pub max_flows: usize,
}

/// A validated origin service.
#[derive(Clone, Debug)]
pub struct Service {
    /// Its name, as edges route to it.
    pub name: String,
    /// HTTP or TCP.
    pub kind: ServiceKind,
    /// Origin servers, `host:port` (resolved at run time, re-resolved on TTL expiry).
    pub servers: Vec<String>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Response-head timeout (504 after it).
    pub response_timeout: Duration,
    /// Idle pooled connections per server.
    pub max_idle_per_server: usize,
    /// Flows at once.
    pub max_concurrent_streams: usize,
    /// Wait for room past the cap.
    pub queue_timeout: Duration,
    /// Active health checks, if configured.
    pub health: Option<HealthCheck>,
}

/// Validated health-check settings.
#[derive(Clone, Debug)]
pub struct HealthCheck {
    /// Path to GET.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Successes to come back up.
    pub healthy_threshold: u32,
    /// Failures to go down.
    pub unhealthy_threshold: u32,
}

/// Loads and validates a connector config.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file: File = load_toml(path)?;
    let v = Validator::new(path);
    let identity = load_identity(&v, &file.node, &file.mesh, Role::Connector)?;
    if identity.me.address.is_none() {
        // It dials out: the edges learn where it is from its own frames, so it must know
        // where every edge is.
        if let Some(e) = identity
            .members
            .iter()
            .find(|m| m.role == Role::Edge && m.address.is_none())
        {
            return Err(v.invalid(
                "mesh.members",
                format!(
                    "this connector has no `address`, so it dials out to the edges; edge {:?} needs an `address` for it to dial",
                    e.name
                ),
            ));
        }
    }
    if file.services.is_empty() {
        return Err(v.invalid(
            "services",
            "no services: add at least one [services.NAME] with `servers`",
        ));
    }
    let mut services = BTreeMap::new();
    for (name, s) in file.services {
        let service = validate_service(&v, &format!("services.{name}"), &name, s)?;
        services.insert(name, service);
    }
    v.in_range("shutdown_grace_ms", file.shutdown_grace_ms, 0..=3_600_000)?;
    let worker_threads = match file.node.worker_threads {
        Some(n) => Some(v.in_range("node.worker_threads", n, 0..=1024)? as usize),
        None => None,
    };
    v.mesh_sections(&file.routing, &file.membership)?;
    let wireguard = match file.wireguard {
        None => None,
        Some(w) => {
            if w.listen.ip().is_unspecified() {
                return Err(v.invalid(
                    "wireguard.listen",
                    "must be the connector's address on the WireGuard interface, not a wildcard: \
                     flows here are trusted because WireGuard authenticated them",
                ));
            }
            if w.allowed_sources.is_empty() {
                return Err(v.invalid(
                    "wireguard.allowed_sources",
                    "name the edges' tunnel addresses (or their network)",
                ));
            }
            let mut allowed_sources = Vec::new();
            for (i, a) in w.allowed_sources.iter().enumerate() {
                let net = a
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|e| {
                        v.invalid(
                            format!("wireguard.allowed_sources[{i}]"),
                            format!("{a:?}: {e}"),
                        )
                    })?;
                allowed_sources.push(net);
            }
            let max_flows = v.in_range("wireguard.max_flows", w.max_flows, 1..=1_000_000)? as usize;
            Some(WireguardListener {
                listen: w.listen,
                allowed_sources,
                max_flows,
            })
        }
    };
    Ok(Config {
        wireguard,
        identity,
        listen: file.node.listen,
        admin: v.admin(file.admin.as_ref())?,
        log: file.log,
        shutdown_grace: Duration::from_millis(file.shutdown_grace_ms),
        worker_threads,
        routing: file.routing,
        membership: file.membership,
        services,
    })
}

/// Checks one service section; `at` is its key (`services.web`) for messages.
pub fn validate_service(
    v: &Validator,
    at: &str,
    name: &str,
    s: ServiceSection,
) -> Result<Service, ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    if s.servers.is_empty() {
        return Err(v.invalid(key("servers"), "needs at least one origin server"));
    }
    for (i, server) in s.servers.iter().enumerate() {
        skylane_shared::resolve::split_host_port(server)
            .map_err(|e| v.invalid(format!("{at}.servers[{i}]"), e.to_string()))?;
    }
    v.in_range(
        &key("connect_timeout_ms"),
        s.connect_timeout_ms,
        1..=600_000,
    )?;
    v.in_range(
        &key("response_timeout_ms"),
        s.response_timeout_ms,
        1..=3_600_000,
    )?;
    let health = match s.health_check {
        None => None,
        Some(h) => {
            let hk = |k: &str| format!("{at}.health_check.{k}");
            v.in_range(&hk("interval_ms"), h.interval_ms, 10..=3_600_000)?;
            v.in_range(&hk("timeout_ms"), h.timeout_ms, 1..=600_000)?;
            v.in_range(
                &hk("healthy_threshold"),
                h.healthy_threshold.into(),
                1..=100,
            )?;
            v.in_range(
                &hk("unhealthy_threshold"),
                h.unhealthy_threshold.into(),
                1..=100,
            )?;
            if !h.path.starts_with('/') {
                return Err(v.invalid(hk("path"), "must start with '/'"));
            }
            Some(HealthCheck {
                path: h.path,
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            })
        }
    };
    let max_concurrent_streams = v.in_range(
        &key("max_concurrent_streams"),
        s.max_concurrent_streams,
        1..=10_000_000,
    )? as usize;
    let queue_timeout = Duration::from_millis(v.in_range(
        &key("queue_timeout_ms"),
        s.queue_timeout_ms,
        0..=600_000,
    )?);
    Ok(Service {
        name: name.to_owned(),
        kind: s.kind,
        servers: s.servers,
        connect_timeout: Duration::from_millis(s.connect_timeout_ms),
        response_timeout: Duration::from_millis(s.response_timeout_ms),
        max_idle_per_server: s.max_idle_per_server,
        max_concurrent_streams,
        queue_timeout,
        health,
    })
}
