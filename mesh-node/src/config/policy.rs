//! The edge-policy sections of the config: connection and request limits, timeouts, the
//! client address, rate-limit zones and "under attack" mode. Each section has safe defaults
//! (written next to each field), so an edge with none of them is protected already.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use skylane_shared::config::{ConfigError, Secret, Validator};

/// `[limits]`: what one client, and everyone together, may hold open.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Client connections over all listeners. Default: the open-file limit the process
    /// got at start minus 512 (for tunnels, origin DNS, logs), so the edge refuses a
    /// connection (counted) before the kernel refuses a descriptor.
    pub max_connections: Option<u64>,
    /// Connections from one IP address. Default 256: a browser opens 6–8 per site, a
    /// large office behind one NAT a few hundred.
    pub max_connections_per_ip: u64,
    /// Connections from one /24 (IPv4) or /56 (IPv6) prefix. Default 1024.
    pub max_connections_per_prefix: u64,
    /// New connections per second from one IP (sustained). Default 50.
    pub new_connections_per_ip_per_s: f64,
    /// New connections one IP may open in a burst. Default 100.
    pub new_connections_burst: u64,
    /// Largest request head (request line and header fields). Default 64 KiB; the
    /// HTTP/1 parser needs at least 8 KiB.
    pub max_request_head_bytes: u64,
    /// Concurrent HTTP/2 streams per connection. Default 128.
    pub http2_max_concurrent_streams: u64,
    /// Concurrent flows (requests in progress, websockets, TCP connections) through the
    /// tunnel from the whole edge; the excess gets 503 with `Retry-After`. Default 100 000.
    pub max_flows: u64,
    /// Concurrent flows from one IP; the excess gets 429. Default 1000: one client
    /// cannot take the tunnel from everyone.
    pub max_flows_per_ip: u64,
    /// TLS handshakes in progress at once; the next ones wait their turn (within the
    /// handshake timeout). Default 1024. It bounds the memory of half-done handshakes and
    /// how many handshakes' CPU a burst puts ahead of the connections already open. A
    /// handshake holds its turn for one round trip to the client, so the cap is also a
    /// ceiling of cap / RTT handshakes per second: keep it high on a far-reaching edge.
    pub max_concurrent_tls_handshakes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_connections_per_ip: 256,
            max_connections_per_prefix: 1024,
            new_connections_per_ip_per_s: 50.0,
            new_connections_burst: 100,
            max_request_head_bytes: 64 * 1024,
            http2_max_concurrent_streams: 128,
            max_flows: 100_000,
            max_flows_per_ip: 1000,
            max_concurrent_tls_handshakes: 1024,
        }
    }
}

/// `[timeouts]`: how long the edge waits for each thing a client or the tunnel owes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    /// The TLS handshake, from accept. Default 10 s.
    pub tls_handshake_ms: u64,
    /// A whole request head, from its first byte (or, for a connection's first request,
    /// from the end of the TLS handshake): slow-header attacks end here. Default 10 s.
    pub request_head_ms: u64,
    /// Silence inside a request body. Default 30 s.
    pub request_body_idle_ms: u64,
    /// An idle keep-alive connection (no request in flight, nothing arriving). Default 75 s.
    pub keepalive_idle_ms: u64,
    /// HTTP/2 PING interval on a connection that is otherwise quiet. Default 30 s.
    pub http2_ping_interval_ms: u64,
    /// How long an HTTP/2 PING may go unanswered before the connection is closed.
    /// Default 15 s.
    pub http2_ping_timeout_ms: u64,
    /// A websocket whose client has sent nothing for this long gets a ping from the edge.
    /// Default 30 s.
    pub websocket_ping_interval_ms: u64,
    /// A websocket whose client has sent nothing, not even the pong to that ping, for this
    /// long is closed. Must be longer than the ping interval. Default 75 s.
    pub websocket_idle_ms: u64,
    /// Opening a stream on the tunnel (waits only when the tunnel is saturated); past it
    /// the client gets 503 with `Retry-After`. Default 5 s.
    pub tunnel_open_ms: u64,
    /// A raw TCP flow with no byte either way. Default 1 hour.
    pub tcp_idle_ms: u64,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            tls_handshake_ms: 10_000,
            request_head_ms: 10_000,
            request_body_idle_ms: 30_000,
            keepalive_idle_ms: 75_000,
            http2_ping_interval_ms: 30_000,
            http2_ping_timeout_ms: 15_000,
            websocket_ping_interval_ms: 30_000,
            websocket_idle_ms: 75_000,
            tunnel_open_ms: 5_000,
            tcp_idle_ms: 3_600_000,
        }
    }
}

/// `[client_address]`: who the client is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAddressSection {
    /// Peers (addresses or CIDR prefixes) whose `X-Forwarded-For`/`Forwarded` are
    /// believed: a load balancer in front of the edge. From anyone else those headers are
    /// dropped and the TCP peer is the client. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Expect a PROXY protocol (v1 or v2) header on every connection from a trusted
    /// proxy, on every listener. Default false.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// `[[rate_limits]]`: a named rate-limit zone that routes refer to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Name routes use in `rate_limits = [...]`.
    pub name: String,
    /// What one bucket counts: `ip` (default; IPv6 by /64), `header:<name>` or
    /// `cookie:<name>` (requests without it share one bucket per IP).
    #[serde(default = "default_rate_key")]
    pub key: String,
    /// Sustained requests per second per key.
    pub requests_per_s: f64,
    /// Requests a key may make at once above the sustained rate. Default: one second's
    /// worth (at least 1).
    pub burst: Option<u64>,
}

fn default_rate_key() -> String {
    "ip".into()
}

/// `[under_attack]`: the browser challenge.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnderAttackSection {
    /// A file holding the mesh-wide challenge secret (at least 32 bytes; every edge must
    /// have the same one, so a clearance issued by one edge is good at all). Required
    /// for the mode to be switched on.
    pub secret_file: Option<PathBuf>,
    /// Leading zero bits the browser's proof of work must find (each bit doubles the
    /// work; 18 takes a phone about half a second). Default 18.
    #[serde(default = "default_difficulty")]
    pub difficulty_bits: u64,
    /// How long a clearance cookie is good. Default 1 hour.
    #[serde(default = "default_clearance_ttl")]
    pub clearance_ttl_s: u64,
    /// How long a challenge page may take to be solved. Default 5 minutes.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl_s: u64,
    /// Hosts (exact or `*.example.com`, or `*`) under attack from start, until switched off.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Switching on by itself.
    pub auto: Option<AutoSection>,
}

fn default_difficulty() -> u64 {
    18
}
fn default_clearance_ttl() -> u64 {
    3600
}
fn default_challenge_ttl() -> u64 {
    300
}

/// `[under_attack.auto]`: when a route's traffic looks like an attack.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSection {
    /// Switch a route's host on when this edge serves it more requests per second than
    /// this (over `window_s`).
    pub requests_per_s: Option<f64>,
    /// Or when more than this fraction of its requests get a 5xx from the origin side.
    pub origin_error_ratio: Option<f64>,
    /// Requests a window needs before the error ratio counts. Default 100.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// The measuring window. Default 10 s.
    #[serde(default = "default_window")]
    pub window_s: u64,
    /// The mode goes off by itself this long after the trigger last fired. Default 300 s.
    #[serde(default = "default_cool_down")]
    pub cool_down_s: u64,
}

fn default_min_requests() -> u64 {
    100
}
fn default_window() -> u64 {
    10
}
fn default_cool_down() -> u64 {
    300
}

/// Validated limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// See [`LimitsSection::max_connections`]; `None`: from the open-file limit.
    pub max_connections: Option<usize>,
    /// Per IP.
    pub max_connections_per_ip: u32,
    /// Per /24 or /56.
    pub max_connections_per_prefix: u32,
    /// New connections per second per IP.
    pub new_connections_per_ip_per_s: f64,
    /// Their burst.
    pub new_connections_burst: u32,
    /// Largest request head.
    pub max_request_head_bytes: usize,
    /// HTTP/2 streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// Flows through the tunnel.
    pub max_flows: usize,
    /// Flows per IP.
    pub max_flows_per_ip: u32,
    /// Handshakes in progress at once.
    pub max_concurrent_tls_handshakes: usize,
}

/// Validated timeouts.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// TLS handshake.
    pub tls_handshake: Duration,
    /// Request head.
    pub request_head: Duration,
    /// Silence inside a request body.
    pub request_body_idle: Duration,
    /// Idle keep-alive connection.
    pub keepalive_idle: Duration,
    /// HTTP/2 PING interval.
    pub http2_ping_interval: Duration,
    /// HTTP/2 PING answer.
    pub http2_ping_timeout: Duration,
    /// Websocket ping interval.
    pub websocket_ping_interval: Duration,
    /// Websocket silence.
    pub websocket_idle: Duration,
    /// Opening a tunnel stream.
    pub tunnel_open: Duration,
    /// Raw TCP silence.
    pub tcp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let v = Validator::new(std::path::Path::new("defaults"));
        match validate_timeouts(&v, &TimeoutsSection::default()) {
            Ok(t) => t,
            Err(e) => unreachable!("the default timeouts are valid: {e}"),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let v = Validator::new(std::path::Path::new("defaults"));
        match validate_limits(&v, &LimitsSection::default()) {
            Ok(l) => l,
            Err(e) => unreachable!("the default limits are valid: {e}"),
        }
    }
}

/// An IP prefix (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(&canonical(*ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (dual-stack listeners report
/// IPv4 clients that way).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Validated client-address policy.
#[derive(Clone, Debug, Default)]
pub struct ClientAddress {
    /// Trusted proxies.
    pub trusted_proxies: Vec<Cidr>,
    /// Whether trusted proxies send a PROXY protocol header.
    pub proxy_protocol: bool,
}

/// What a rate-limit bucket is keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// The client address (IPv6 by /64).
    Ip,
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
}

/// A validated rate-limit zone.
#[derive(Clone, Debug)]
pub struct RateLimit {
    /// Its name.
    pub name: String,
    /// What a bucket counts.
    pub key: RateKey,
    /// Sustained rate.
    pub requests_per_s: f64,
    /// Burst.
    pub burst: u32,
}

/// Validated under-attack settings.
#[derive(Clone, Debug)]
pub struct UnderAttack {
    /// The mesh-wide secret; `None`: the mode cannot be switched on.
    pub secret: Option<Secret>,
    /// Proof-of-work difficulty.
    pub difficulty_bits: u8,
    /// Clearance life.
    pub clearance_ttl: Duration,
    /// Challenge life.
    pub challenge_ttl: Duration,
    /// Hosts on from start.
    pub hosts: Vec<String>,
    /// Automatic switching.
    pub auto: Option<AutoTrigger>,
}

impl Default for UnderAttack {
    fn default() -> Self {
        Self {
            secret: None,
            difficulty_bits: default_difficulty() as u8,
            clearance_ttl: Duration::from_secs(default_clearance_ttl()),
            challenge_ttl: Duration::from_secs(default_challenge_ttl()),
            hosts: Vec::new(),
            auto: None,
        }
    }
}

/// Validated automatic switching.
#[derive(Clone, Debug)]
pub struct AutoTrigger {
    /// Request-rate threshold.
    pub requests_per_s: Option<f64>,
    /// Origin 5xx ratio threshold.
    pub origin_error_ratio: Option<f64>,
    /// Requests a window needs for the ratio to count.
    pub min_requests: u64,
    /// The window.
    pub window: Duration,
    /// Off again this long after the last trigger.
    pub cool_down: Duration,
}

fn ms(
    v: &Validator,
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(v.in_range(key, value, range)?))
}

/// Checks `[limits]`.
pub fn validate_limits(v: &Validator, s: &LimitsSection) -> Result<Limits, ConfigError> {
    let max_connections = match s.max_connections {
        Some(n) => Some(v.in_range("limits.max_connections", n, 1..=10_000_000)? as usize),
        None => None,
    };
    let rate = s.new_connections_per_ip_per_s;
    if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
        return Err(v.invalid(
            "limits.new_connections_per_ip_per_s",
            format!("{rate} is not in (0, 1000000]"),
        ));
    }
    Ok(Limits {
        max_connections,
        max_connections_per_ip: v.in_range(
            "limits.max_connections_per_ip",
            s.max_connections_per_ip,
            1..=10_000_000,
        )? as u32,
        max_connections_per_prefix: v.in_range(
            "limits.max_connections_per_prefix",
            s.max_connections_per_prefix,
            s.max_connections_per_ip..=10_000_000,
        )? as u32,
        new_connections_per_ip_per_s: rate,
        new_connections_burst: v.in_range(
            "limits.new_connections_burst",
            s.new_connections_burst,
            1..=1_000_000,
        )? as u32,
        max_request_head_bytes: v.in_range(
            "limits.max_request_head_bytes",
            s.max_request_head_bytes,
            8192..=16 * 1024 * 1024,
        )? as usize,
        http2_max_concurrent_streams: v.in_range(
            "limits.http2_max_concurrent_streams",
            s.http2_max_concurrent_streams,
            1..=10_000,
        )? as u32,
        max_flows: v.in_range("limits.max_flows", s.max_flows, 1..=10_000_000)? as usize,
        max_flows_per_ip: v.in_range(
            "limits.max_flows_per_ip",
            s.max_flows_per_ip,
            1..=10_000_000,
        )? as u32,
        max_concurrent_tls_handshakes: v.in_range(
            "limits.max_concurrent_tls_handshakes",
            s.max_concurrent_tls_handshakes,
            1..=100_000,
        )? as usize,
    })
}

/// Checks `[timeouts]`.
pub fn validate_timeouts(v: &Validator, s: &TimeoutsSection) -> Result<Timeouts, ConfigError> {
    const DAY: u64 = 86_400_000;
    let t = Timeouts {
        tls_handshake: ms(
            v,
            "timeouts.tls_handshake_ms",
            s.tls_handshake_ms,
            100..=600_000,
        )?,
        request_head: ms(
            v,
            "timeouts.request_head_ms",
            s.request_head_ms,
            100..=600_000,
        )?,
        request_body_idle: ms(
            v,
            "timeouts.request_body_idle_ms",
            s.request_body_idle_ms,
            100..=DAY,
        )?,
        keepalive_idle: ms(
            v,
            "timeouts.keepalive_idle_ms",
            s.keepalive_idle_ms,
            100..=DAY,
        )?,
        http2_ping_interval: ms(
            v,
            "timeouts.http2_ping_interval_ms",
            s.http2_ping_interval_ms,
            100..=DAY,
        )?,
        http2_ping_timeout: ms(
            v,
            "timeouts.http2_ping_timeout_ms",
            s.http2_ping_timeout_ms,
            100..=DAY,
        )?,
        websocket_ping_interval: ms(
            v,
            "timeouts.websocket_ping_interval_ms",
            s.websocket_ping_interval_ms,
            100..=DAY,
        )?,
        websocket_idle: ms(
            v,
            "timeouts.websocket_idle_ms",
            s.websocket_idle_ms,
            100..=DAY,
        )?,
        tunnel_open: ms(v, "timeouts.tunnel_open_ms", s.tunnel_open_ms, 10..=600_000)?,
        tcp_idle: ms(v, "timeouts.tcp_idle_ms", s.tcp_idle_ms, 100..=7 * DAY)?,
    };
    if t.websocket_idle <= t.websocket_ping_interval {
        return Err(v.invalid(
            "timeouts.websocket_idle_ms",
            "must be longer than websocket_ping_interval_ms, or live clients are closed before they can answer a ping",
        ));
    }
    Ok(t)
}

/// Checks `[client_address]`.
pub fn validate_client_address(
    v: &Validator,
    s: &ClientAddressSection,
) -> Result<ClientAddress, ConfigError> {
    let mut trusted = Vec::new();
    for (i, p) in s.trusted_proxies.iter().enumerate() {
        let net = p
            .parse::<ipnet::IpNet>()
            .or_else(|_| p.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                v.invalid(
                    format!("client_address.trusted_proxies[{i}]"),
                    format!("{p:?} is not an address or CIDR prefix (e.g. 10.0.0.0/8)"),
                )
            })?;
        trusted.push(Cidr(net.trunc()));
    }
    if s.proxy_protocol && trusted.is_empty() {
        return Err(v.invalid(
            "client_address.proxy_protocol",
            "needs trusted_proxies: the PROXY header is taken only from them",
        ));
    }
    Ok(ClientAddress {
        trusted_proxies: trusted,
        proxy_protocol: s.proxy_protocol,
    })
}

/// Checks `[[rate_limits]]`.
pub fn validate_rate_limits(
    v: &Validator,
    zones: &[RateLimitSection],
) -> Result<Vec<RateLimit>, ConfigError> {
    let mut out: Vec<RateLimit> = Vec::new();
    for (i, z) in zones.iter().enumerate() {
        let at = |k: &str| format!("rate_limits[{i}].{k}");
        if z.name.is_empty() || out.iter().any(|o| o.name == z.name) {
            return Err(v.invalid(at("name"), "must be set and unique"));
        }
        let key = match z.key.split_once(':') {
            None if z.key == "ip" => RateKey::Ip,
            Some(("header", h)) => RateKey::Header(
                http::HeaderName::from_bytes(h.trim().as_bytes())
                    .map_err(|_| v.invalid(at("key"), format!("{h:?} is not a header name")))?,
            ),
            Some(("cookie", c)) if !c.trim().is_empty() => RateKey::Cookie(c.trim().to_owned()),
            _ => {
                return Err(v.invalid(
                    at("key"),
                    format!(
                        "{:?}: use \"ip\", \"header:<name>\" or \"cookie:<name>\"",
                        z.key
                    ),
                ));
            }
        };
        let rate = z.requests_per_s;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1e7) {
            return Err(v.invalid(
                at("requests_per_s"),
                format!("{rate} is not in (0, 10000000]"),
            ));
        }
        let burst = match z.burst {
            Some(b) => v.in_range(&at("burst"), b, 1..=10_000_000)? as u32,
            None => rate.ceil().max(1.0) as u32,
        };
        out.push(RateLimit {
            name: z.name.clone(),
            key,
            requests_per_s: rate,
            burst,
        });
    }
    Ok(out)
}

/// Checks `[under_attack]`, reading the secret file.
pub fn validate_under_attack(
    v: &Validator,
    s: Option<&UnderAttackSection>,
) -> Result<UnderAttack, ConfigError> {
    let Some(s) = s else {
        return Ok(UnderAttack::default());
    };
    let secret = match &s.secret_file {
        None => None,
        Some(f) => Some(v.secret_file("under_attack.secret_file", f, 32)?),
    };
    if secret.is_none() && (!s.hosts.is_empty() || s.auto.is_some()) {
        return Err(v.invalid(
            "under_attack.secret_file",
            "hosts or auto switching need the mesh-wide secret",
        ));
    }
    let auto = match &s.auto {
        None => None,
        Some(a) => {
            if a.requests_per_s.is_none() && a.origin_error_ratio.is_none() {
                return Err(v.invalid(
                    "under_attack.auto",
                    "set requests_per_s, origin_error_ratio, or both",
                ));
            }
            if let Some(r) = a.requests_per_s
                && !(r.is_finite() && r > 0.0)
            {
                return Err(v.invalid("under_attack.auto.requests_per_s", "must be > 0"));
            }
            if let Some(r) = a.origin_error_ratio
                && !(r.is_finite() && r > 0.0 && r <= 1.0)
            {
                return Err(v.invalid("under_attack.auto.origin_error_ratio", "must be in (0, 1]"));
            }
            Some(AutoTrigger {
                requests_per_s: a.requests_per_s,
                origin_error_ratio: a.origin_error_ratio,
                min_requests: v.in_range(
                    "under_attack.auto.min_requests",
                    a.min_requests,
                    1..=u64::MAX,
                )?,
                window: Duration::from_secs(v.in_range(
                    "under_attack.auto.window_s",
                    a.window_s,
                    1..=3600,
                )?),
                cool_down: Duration::from_secs(v.in_range(
                    "under_attack.auto.cool_down_s",
                    a.cool_down_s,
                    1..=86_400,
                )?),
            })
        }
    };
    for (i, h) in s.hosts.iter().enumerate() {
        if h.is_empty() {
            return Err(v.invalid(format!("under_attack.hosts[{i}]"), "must not be empty"));
        }
    }
    Ok(UnderAttack {
        secret,
        difficulty_bits: v.in_range("under_attack.difficulty_bits", s.difficulty_bits, 1..=32)?
            as u8,
        clearance_ttl: Duration::from_secs(v.in_range(
            "under_attack.clearance_ttl_s",
            s.clearance_ttl_s,
            60..=30 * 86_400,
        )?),
        challenge_ttl: Duration::from_secs(v.in_range(
            "under_attack.challenge_ttl_s",
            s.challenge_ttl_s,
            10..=86_400,
        )?),
        hosts: s.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_secrets_are_masked() {
        let _ = Limits::default();
        let _ = Timeouts::default();
        assert_eq!(
            format!("{:?}", Secret(b"hunter2".to_vec())),
            "Secret(MASKED)"
        );
    }

    #[test]
    fn cidrs_match_mapped_addresses() {
        let v = Validator::new(std::path::Path::new("t.toml"));
        let c = validate_client_address(
            &v,
            &ClientAddressSection {
                trusted_proxies: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
                proxy_protocol: true,
            },
        )
        .expect("valid");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert!(c.trusted_proxies[0].contains(&mapped));
        assert!(c.trusted_proxies[1].contains(&"192.0.2.7".parse().expect("ip")));
        assert!(!c.trusted_proxies[1].contains(&"192.0.2.8".parse().expect("ip")));
        let bad = validate_client_address(
            &v,
            &ClientAddressSection {
                trusted_proxies: vec!["10.0.0.0/33".into()],
                proxy_protocol: false,
            },
        );
        assert!(
            bad.expect_err("invalid")
                .to_string()
                .contains("trusted_proxies[0]")
        );
    }
}
