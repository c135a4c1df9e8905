//! The edge's listeners and lifecycle: HTTPS (HTTP/1.1 + HTTP/2), the plain-HTTP
//! redirect, raw TCP, the admin API, the policy's background tasks, and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use skylane_shared::lifecycle::Shutdown;
use skylane_shared::membership::Role;
use skylane_shared::mesh::MeshSocket;
use skylane_shared::mesh::control::MeshControl;
use skylane_shared::mesh::report;
use skylane_shared::quic;
use skylane_shared::shards::Shards;
use skylane_shared::telemetry::{self, AdminRoutes};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, purge};
use crate::config::Config;
use crate::phases::accept::{Admission, ConnPermit};
use crate::phases::client_addr::{Peer, read_proxy_header};
use crate::phases::connection::{self, ConnWatch, Watched};
use crate::phases::flows::Flows;
use crate::phases::under_attack::{self, AutoWatch, UnderAttackState};
use crate::proxy::{self, Edge};
use crate::reload::{self, Live};
use crate::tunnel::{Direct, TunnelPool, WgLink};

/// Descriptors kept back from `max_connections` when it comes from the open-file limit:
/// tunnels, DNS, the admin listener, logs.
const RESERVED_FILES: u64 = 512;

/// How often limiter state of quiet clients is dropped.
const HOUSEKEEPING: Duration = Duration::from_secs(10);

/// Already-bound listeners, so tests can bind port 0 and read the ports back.
#[derive(Debug, Default)]
pub struct Listeners {
    /// HTTPS.
    pub https: Option<TcpListener>,
    /// Plain HTTP (redirects).
    pub http: Option<TcpListener>,
    /// Raw TCP listeners and their services, in config order.
    pub tcp: Vec<(TcpListener, String)>,
    /// Admin API.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        Self::take_or_bind(config, None).await
    }

    /// Takes each listener the config names from a process taken over, when it handed one
    /// over on that address, and binds the others.
    pub async fn take_or_bind(
        config: &Config,
        mut taken: Option<&mut skylane_shared::handover::Successor>,
    ) -> std::io::Result<Self> {
        let mut listen = async |label: String, addr: SocketAddr| {
            skylane_shared::cli::take_or_bind_listener(taken.as_deref_mut(), &label, addr).await
        };
        let mut l = Listeners::default();
        if let Some(h) = &config.https {
            l.https = Some(listen("https".into(), h.listen).await?);
        }
        if let Some(addr) = config.http_redirect {
            l.http = Some(listen("http".into(), addr).await?);
        }
        for t in &config.tcp {
            let label = format!("tcp/{}", t.listen);
            l.tcp
                .push((listen(label, t.listen).await?, t.service.clone()));
        }
        if let Some(admin) = &config.admin {
            l.admin = Some(listen("admin".into(), admin.listen).await?);
        }
        Ok(l)
    }
}

struct Status {
    name: String,
    id: String,
    socket: Arc<MeshSocket>,
    live: Arc<Live>,
    admission: Arc<Admission>,
    control: Arc<MeshControl>,
    draining: CancellationToken,
    /// Carries other edges' tunnels to stock WireGuard endpoints, and brings this edge's
    /// back through theirs; present when `[[wireguard.peers]]` are.
    wg_relay: Option<Arc<skylane_shared::wireguard::relay::EndpointRelay>>,
}

/// `POST /purge`: `{"kind": "url", "value": "chat.example.com/static/app.js"}` (kinds
/// `url`, `prefix`, `tag`, `everything`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeAction {
    kind: String,
    value: Option<String>,
}

/// `POST /under-attack`: `{"host": "chat.example.com", "on": true, "for_s": 3600}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UnderAttackAction {
    host: String,
    on: bool,
    /// How long the switch holds (default: 30 days, i.e. until switched again).
    for_s: Option<u64>,
}

impl AdminRoutes for Status {
    fn status(&self) -> serde_json::Value {
        let generation = self.live.generation();
        let edge = &generation.edge;
        let policy = &edge.policy;
        json!({
            "node": self.name,
            "id": self.id,
            "role": "edge",
            "mesh_socket": self.socket.udp_addr().map(|a| a.to_string()).unwrap_or_default(),
            "draining": self.draining.is_cancelled(),
            "config_generation": generation.number,
            "tunnels": edge.tunnels.status(),
            "connections": {
                "open": self.admission.open(),
                "max": self.admission.max_total(),
                "open_file_limit": skylane_shared::cli::open_file_limit(),
            },
            "flows": {
                "open": policy.flows.open_now(),
                "max": policy.limits.max_flows,
            },
            "under_attack": {
                "available": policy.challenger.is_some(),
                "switches": policy.under_attack.switches(),
            },
            "cache": edge.cache.as_ref().map(|c| c.status()),
            "acme": edge.acme.as_ref().map(|a| a.status()),
            "frames": self.socket.counters().snapshot(),
            "wireguard_relay": self.wg_relay.as_ref().map(|r| json!({
                "counters": r.counters(),
                "carried_now": r.carried(),
            })),
            "mesh": self.control.status(),
        })
    }

    fn ready(&self) -> bool {
        !self.draining.is_cancelled() && self.live.edge().tunnels.any_up()
    }

    fn action(&self, path: &str, body: &[u8]) -> Option<Result<serde_json::Value, String>> {
        match path {
            // The node reads its own config file: the body names nothing.
            "/reload" => Some(
                self.live
                    .reload()
                    .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string())),
            ),
            "/under-attack" => Some(self.under_attack(body)),
            "/purge" => Some(self.purge(body)),
            _ => None,
        }
    }
}

impl Status {
    fn purge(&self, body: &[u8]) -> Result<serde_json::Value, String> {
        let action: PurgeAction =
            serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
        let target = purge::Target::parse(&action.kind, action.value.as_deref())?;
        let (id, p) = purge::new_purge(target);
        let value = postcard::to_stdvec(&p).map_err(|e| e.to_string())?;
        self.control
            .post(
                &format!("{}{id}", purge::KEY_PREFIX),
                value,
                purge::PURGE_TTL,
            )
            .map_err(|e| e.to_string())?;
        let removed = self
            .live
            .edge()
            .cache
            .as_ref()
            .and_then(|c| c.apply_purge(&id, &p))
            .unwrap_or(0);
        tracing::warn!(%id, target = ?p.target, removed, "purge issued by an operator");
        Ok(json!({"id": id, "target": p.target, "removed_here": removed}))
    }

    fn under_attack(&self, body: &[u8]) -> Result<serde_json::Value, String> {
        let action: UnderAttackAction =
            serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
        let host = action
            .host
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*'));
        if !valid_host {
            return Err(format!("{:?} is not a host name or pattern", action.host));
        }
        let edge = self.live.edge();
        if action.on && edge.policy.challenger.is_none() {
            return Err(
                "this edge has no [under_attack] secret_file, so it cannot challenge anyone".into(),
            );
        }
        let ttl = Duration::from_secs(action.for_s.unwrap_or(30 * 86_400).clamp(1, 30 * 86_400));
        let key = format!("{}{host}", under_attack::KEY_PREFIX);
        self.control
            .post(&key, under_attack::manual_switch(action.on), ttl)
            .map_err(|e| e.to_string())?;
        refresh_switches(&self.control, &edge.policy.under_attack);
        tracing::warn!(%host, on = action.on, for_s = ttl.as_secs(), "under-attack switch set by an operator");
        Ok(json!({
            "host": host,
            "on": action.on,
            "for_s": ttl.as_secs(),
            "switches": edge.policy.under_attack.switches(),
        }))
    }
}

/// Reads the switches off the bulletin into `state`.
fn refresh_switches(control: &MeshControl, state: &UnderAttackState) {
    let switches = control.read_bulletin(|b, now| {
        under_attack::switches_from(
            b.entries_with_prefix(under_attack::KEY_PREFIX, now)
                .map(|e| {
                    (
                        e.key.as_str(),
                        e.value.as_slice(),
                        control.member_name(&e.stamp.origin),
                        e.expires_unix_ms,
                    )
                }),
            now,
        )
    });
    if let Some(s) = switches {
        state.set_switches(s);
    }
}

/// Applies the purges on the bulletin this edge has not applied yet.
fn apply_purges(control: &MeshControl, cache: &Cache) {
    let purges = control.read_bulletin(|b, now| {
        b.entries_with_prefix(purge::KEY_PREFIX, now)
            .filter_map(|e| {
                let id = e.key.strip_prefix(purge::KEY_PREFIX)?.to_owned();
                let p: purge::Purge = postcard::from_bytes(&e.value).ok()?;
                Some((id, p))
            })
            .collect::<Vec<_>>()
    });
    let Some(purges) = purges else { return };
    let live: std::collections::HashSet<String> = purges.iter().map(|(id, _)| id.clone()).collect();
    for (id, p) in &purges {
        cache.apply_purge(id, p);
    }
    cache.forget_purges(&live);
}

/// Keeps the switches current and applies purges: on every bulletin change, and every
/// second (expiry).
async fn follow_switches(control: Arc<MeshControl>, live: Arc<Live>, stop: CancellationToken) {
    let mut changes = control.bulletin_changes();
    loop {
        let edge = live.edge();
        refresh_switches(&control, &edge.policy.under_attack);
        if let Some(cache) = &edge.cache {
            apply_purges(&control, cache);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The automatic trigger: every window, each route's counts are judged, and a route
/// over its threshold switches its host on mesh-wide for the cool-down.
async fn auto_trigger(control: Arc<MeshControl>, live: Arc<Live>, stop: CancellationToken) {
    // The cool-downs of the generation's routes (a reload starts them afresh).
    let mut watch = (u64::MAX, AutoWatch::new(0));
    loop {
        let window = live
            .edge()
            .policy
            .auto
            .as_ref()
            .map_or(Duration::from_secs(1), |a| a.window);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(window) => {}
        }
        let generation = live.generation();
        let edge = &generation.edge;
        let Some(auto) = &edge.policy.auto else {
            continue;
        };
        if watch.0 != generation.number {
            watch = (generation.number, AutoWatch::new(edge.routes.all().len()));
        }
        let watch = &watch.1;
        for (i, routed) in edge.routes.all().iter().enumerate() {
            let (requests, errors) = routed.load.take();
            if routed.route.api {
                continue;
            }
            let Some(why) = under_attack::should_trigger(auto, requests, errors, auto.window)
            else {
                continue;
            };
            if !watch.should_post(i, connection::now_ms(), auto.cool_down) {
                continue;
            }
            let key = format!("{}{}", under_attack::KEY_PREFIX, routed.route.host);
            match control.post(&key, under_attack::auto_switch(), auto.cool_down) {
                Ok(_) => {
                    tracing::warn!(host = %routed.route.host, trigger = ?why, cool_down_s = auto.cool_down.as_secs(), "under attack: switched on automatically");
                    metrics::counter!("skylane_edge_under_attack_auto_total").increment(1);
                }
                Err(e) => tracing::warn!(error = %e, "automatic under-attack switch not posted"),
            }
        }
    }
}

/// Reloads the config on every SIGHUP (see [`reload`]).
async fn reload_on_signal(
    live: Arc<Live>,
    signal: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = signal.notified() => {
                // Logged and counted inside; a refused config leaves the old one serving.
                let _ = live.reload();
            }
        }
    }
}

/// Drops limiter state of clients gone quiet.
async fn housekeeping(live: Arc<Live>, admission: Arc<Admission>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HOUSEKEEPING) => {}
        }
        live.edge().policy.zones.housekeeping();
        admission.housekeeping();
    }
}

/// `max_connections`, or the open-file limit less a reserve.
fn max_connections(config: &Config) -> usize {
    config.limits.max_connections.unwrap_or_else(|| {
        let files = skylane_shared::cli::open_file_limit().unwrap_or(1024);
        files.saturating_sub(RESERVED_FILES).max(64) as usize
    })
}

/// Runs the edge until shutdown.
pub async fn serve(
    config: Config,
    config_path: std::path::PathBuf,
    socket: Arc<MeshSocket>,
    listeners: Listeners,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: Shutdown,
    mut successor: Option<skylane_shared::handover::Successor>,
) -> anyhow::Result<()> {
    let identity = config.identity.clone();
    // The runtime `main` built is shard 0's; this starts the others.
    let shards = Shards::for_config(config.worker_threads)
        .map_err(|e| anyhow::anyhow!("cannot start the edge's shards: {e}"))?;
    // A process that took over another issues connection IDs of the next generation, so
    // the old one's packets can be told apart and passed back to it.
    let generation = skylane_shared::handover::generation_after(successor.as_mut(), &socket)?;
    let endpoint = quic::endpoint(socket.clone(), &identity.key, false, generation)?;
    let handover_point = skylane_shared::handover::point_name(&identity.me.name, config.listen);
    let handover_sockets = crate::handover::sockets(&listeners, &socket)?;
    let stop_tunnels = CancellationToken::new();
    let control = MeshControl::start(
        socket.clone(),
        Role::Edge,
        config.routing.clone(),
        config.membership.clone(),
        stop_tunnels.clone(),
    )?;
    let (mut wg_links, direct, wg_relay) = start_wireguard(
        config.wireguard.as_ref(),
        &socket,
        &identity.members,
        stop_tunnels.clone(),
    )
    .await?;
    // Connectors with `transport = "wireguard"`: a WireGuard tunnel over the mesh socket
    // each, instead of QUIC.
    let (quic_connectors, wg_connectors): (Vec<_>, Vec<_>) = config
        .connectors
        .iter()
        .cloned()
        .partition(|m| m.transport == skylane_shared::membership::Transport::Quic);
    if !wg_connectors.is_empty() {
        let key = skylane_shared::wireguard::SecretKey::derived_from(&identity.key)
            .map_err(|e| anyhow::anyhow!("no WireGuard key for the mesh: {e}"))?;
        let mesh_wg = skylane_shared::wireguard::mesh::MeshWireguard::start(
            socket.clone(),
            key,
            stop_tunnels.clone(),
        )
        .ok_or_else(|| anyhow::anyhow!("the mesh socket's WireGuard queue is taken"))?;
        for member in &wg_connectors {
            let tunnel = mesh_wg.to_connector(member)?;
            tracing::info!(connector = %member.name, "tunnel to connector over WireGuard");
            wg_links.push(WgLink::over_mesh(member, tunnel));
        }
    }
    let tunnels = TunnelPool::start(
        endpoint.clone(),
        socket.clone(),
        control.clone(),
        identity.key.clone(),
        quic_connectors,
        wg_links,
        direct,
        config.tunnel.clone(),
        shards.clone(),
        stop_tunnels.clone(),
    );
    // Restart without refusing connections: a successor may take this process's sockets;
    // a process that took over another says so once a tunnel is up.
    let hand_over = skylane_shared::handover::serve_successors(
        handover_point,
        handover_sockets,
        socket.clone(),
        endpoint.clone(),
        generation,
        shutdown.drain.clone(),
    );
    let taking_over = successor.is_some();
    match successor {
        Some(s) => {
            tokio::spawn(crate::handover::announce_ready(
                s,
                tunnels.clone(),
                hand_over,
            ));
        }
        None => {
            tokio::spawn(hand_over);
        }
    }
    let cache = match config.cache.clone() {
        Some(c) => {
            Some(Arc::new(Cache::new(c).map_err(|e| {
                anyhow::anyhow!("cannot open the cache: {e}")
            })?))
        }
        None => None,
    };
    let admission = Admission::new(config.limits.clone(), max_connections(&config));
    tracing::info!(
        max_connections = admission.max_total(),
        max_flows = config.limits.max_flows,
        "edge limits"
    );
    let acme = config
        .acme
        .clone()
        .map(|a| crate::acme::Acme::new(a, control.clone()));
    if let Some(acme) = &acme {
        tokio::spawn(acme.clone().run(stop_tunnels.clone()));
    }
    let carried = reload::Carried {
        tunnels: tunnels.clone(),
        cache,
        flows: Flows::new(&config.limits),
        acme,
    };
    let admin_token = config.admin.as_ref().and_then(|a| a.token.clone());
    let https_listen = config.https.as_ref().map(|h| h.listen);
    let redirect_https_port = config.redirect_https_port;
    let shutdown_grace = config.shutdown_grace;
    let live = Arc::new(Live::start(config_path, config, carried)?);
    let draining = shutdown.drain.clone();
    tokio::spawn(follow_switches(
        control.clone(),
        live.clone(),
        stop_tunnels.clone(),
    ));
    tokio::spawn(housekeeping(
        live.clone(),
        admission.clone(),
        stop_tunnels.clone(),
    ));
    tokio::spawn(auto_trigger(
        control.clone(),
        live.clone(),
        stop_tunnels.clone(),
    ));
    tokio::spawn(reload_on_signal(
        live.clone(),
        shutdown.reload.clone(),
        stop_tunnels.clone(),
    ));
    {
        let (live, admission) = (live.clone(), admission.clone());
        control.spawn_reporter(
            move || {
                let (requests, errors) = crate::request_metrics::totals();
                let edge = live.edge();
                report::Sample {
                    requests,
                    errors,
                    open_connections: admission.open() as u64,
                    tunnels_up: edge.tunnels.up_count() as u64,
                    cache_hit_ratio: edge.cache.as_ref().map(|c| c.hit_ratio()),
                }
            },
            shutdown.now.clone(),
        );
    }
    if let Some(admin) = listeners.admin {
        let status = Arc::new(Status {
            name: identity.me.name.clone(),
            id: identity.key.id().to_string(),
            socket: socket.clone(),
            live: live.clone(),
            admission: admission.clone(),
            control,
            draining: draining.clone(),
            wg_relay,
        });
        tokio::spawn(telemetry::serve_admin(
            admin,
            metrics,
            status,
            admin_token,
            shutdown.now.clone(),
        ));
    }
    let tracker = TaskTracker::new();
    let connections = TaskTracker::new();
    if taking_over {
        // The old process accepts on the same sockets until this one serves: accept only
        // once a tunnel is up, so no request meets an edge with nowhere to send it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !live.edge().tunnels.any_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut https_port = 443;
    if let (Some(listener), Some(_)) = (listeners.https, https_listen) {
        https_port = listener.local_addr()?.port();
        tracing::info!(listen = %listener.local_addr()?, "https listening");
        tracker.spawn(accept_https(
            listener,
            live.clone(),
            admission.clone(),
            shards.clone(),
            connections.clone(),
            draining.clone(),
        ));
    }
    if let Some(listener) = listeners.http {
        tracing::info!(listen = %listener.local_addr()?, "http redirect listening");
        tracker.spawn(crate::redirect::serve(
            listener,
            redirect_https_port.unwrap_or(https_port),
            live.clone(),
            admission.clone(),
            draining.clone(),
        ));
    }
    for (listener, service) in listeners.tcp {
        tracing::info!(listen = %listener.local_addr()?, %service, "tcp listening");
        tracker.spawn(crate::tcp::serve(
            listener,
            service,
            live.clone(),
            admission.clone(),
            shards.clone(),
            draining.clone(),
        ));
    }
    tracing::info!(node = %identity.me.name, id = %identity.key.id(), mesh = %socket.udp_addr()?, "edge ready");
    tokio::select! {
        _ = draining.cancelled() => {}
        _ = shutdown.now.cancelled() => {}
    }
    tracing::info!(
        grace_ms = shutdown_grace.as_millis() as u64,
        "draining connections"
    );
    tracker.close();
    tracker.wait().await;
    connections.close();
    let drained = async {
        connections.wait().await;
        // Upgraded connections (websockets) outlive their HTTP connection; their place
        // under the connection caps tells when they end too.
        while admission.open() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(shutdown_grace) => tracing::warn!("grace period over; closing open connections"),
        _ = shutdown.now.cancelled() => {}
    }
    stop_tunnels.cancel();
    endpoint.close(0u32.into(), b"edge shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    shards.stop();
    Ok(())
}

/// The accept phase shared by every listener: admission, then (from a trusted proxy that
/// speaks it) the PROXY header. `None`: the connection was refused and is closed.
pub async fn admit(
    tcp: TcpStream,
    tcp_peer: SocketAddr,
    edge: &Edge,
    admission: &Arc<Admission>,
    listener: &'static str,
) -> Option<(TcpStream, Peer, ConnPermit)> {
    let permit = admission.admit(tcp_peer.ip(), listener).ok()?;
    let _ = tcp.set_nodelay(true);
    let policy = &edge.policy.client_address;
    let mut peer = Peer::direct(tcp_peer);
    if policy.proxy_protocol && policy.is_trusted(tcp_peer.ip()) {
        match read_proxy_header(&tcp, edge.policy.timeouts.request_head).await {
            Ok(client) => peer.proxied = client,
            Err(e) => {
                metrics::counter!("skylane_edge_proxy_header_errors_total").increment(1);
                tracing::debug!(%tcp_peer, error = %e, "bad PROXY header; closing");
                return None;
            }
        }
    }
    Some((tcp, peer, permit))
}

/// An HTTP server builder configured by the edge policy.
pub fn http_builder(edge: &Edge) -> auto::Builder<TokioExecutor> {
    let limits = &edge.policy.limits;
    let timeouts = &edge.policy.timeouts;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Head size: HTTP/1's read buffer (the head must fit; bodies stream through it) and
    // HTTP/2's header list. The head timeout is the connection watchdog's, not hyper's.
    builder
        .http1()
        .max_buf_size(limits.max_request_head_bytes.max(8192))
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        // A header block (HEADERS and its CONTINUATIONs) larger than this ends the
        // connection: the bound against CONTINUATION floods.
        .max_header_list_size(limits.max_request_head_bytes as u32)
        // Streams a client opens and resets before the server takes them (rapid reset,
        // CVE-2023-44487): past this many pending, the connection gets GOAWAY.
        .max_pending_accept_reset_streams(Some(50))
        // Streams the server had to reset because the client misbehaved.
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(timeouts.http2_ping_interval))
        .keep_alive_timeout(timeouts.http2_ping_timeout);
    builder
}

async fn accept_https(
    listener: TcpListener,
    live: Arc<Live>,
    admission: Arc<Admission>,
    shards: Arc<Shards>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    // `max_concurrent_tls_handshakes` is one of the `[limits]` a reload does not change.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        live.edge().policy.limits.max_concurrent_tls_handshakes,
    ));
    loop {
        let Some((tcp, tcp_peer)) =
            skylane_shared::lifecycle::accept_until(&listener, &stop, "https").await
        else {
            return;
        };
        // The connection keeps the certificates, HTTP settings and timeouts in force now;
        // each of its requests reads the routes and policy in force when it arrives.
        let generation = live.generation();
        let Some(tls_config) = generation.tls.clone() else {
            return;
        };
        let live = live.clone();
        let admission = admission.clone();
        let stop = stop.clone();
        let handshakes = handshakes.clone();
        // Tracked for the drain from now, though it starts on its shard a moment later.
        let tracked = connections.token();
        shards.spawn_socket(tcp, move |tcp| async move {
            let _tracked = tracked;
            let edge = &generation.edge;
            let Some((tcp, peer, permit)) = admit(tcp, tcp_peer, edge, &admission, "https").await else {
                return;
            };
            let timeouts = &edge.policy.timeouts;
            // The handshake waits its turn, then runs on the handshake threads, both within
            // the handshake timeout.
            let deadline = tokio::time::Instant::now() + timeouts.tls_handshake;
            let handshake = crate::tls::handshakes::accept(deadline, handshakes, tls_config, tcp);
            let tls = match handshake.await {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    metrics::counter!("skylane_edge_tls_handshake_failures_total", "reason" => "error").increment(1);
                    tracing::debug!(%tcp_peer, error = %e, "tls handshake failed");
                    return;
                }
                None => {
                    metrics::counter!("skylane_edge_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                    return;
                }
            };
            // The CA's TLS-ALPN-01 validation only needs the handshake (RFC 8737).
            if tls.connection().alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
                return;
            }
            let watch = ConnWatch::new(Some(permit));
            let service = {
                let watch = watch.clone();
                hyper::service::service_fn(move |req| {
                    proxy::handle(live.edge(), watch.clone(), req, peer, "https")
                })
            };
            let io = TokioIo::new(Watched::new(tls, watch.clone()));
            let conn = generation.http.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let result = connection::supervise(
                conn.as_mut(),
                &watch,
                timeouts,
                |c| c.graceful_shutdown(),
                Duration::from_secs(1),
                &stop,
            )
            .await;
            if let Some(Err(e)) = result {
                tracing::debug!(%tcp_peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Starts one WireGuard tunnel per `[[wireguard.peers]]` entry that a connector or a
/// service is behind; returns the links to those connectors and the services this edge
/// serves itself. With any peer, the edge also carries other edges' tunnels to its peers'
/// endpoints, and its own go through the relays a peer lists when their way fails.
async fn start_wireguard(
    config: Option<&crate::config::wireguard::Wireguard>,
    socket: &Arc<MeshSocket>,
    members: &skylane_shared::membership::Members,
    stop: CancellationToken,
) -> anyhow::Result<WireguardStarted> {
    use skylane_shared::wireguard::WgTunnel;
    use skylane_shared::wireguard::relay::EndpointRelay;
    use skylane_shared::wireguard::tunnel::Ways;
    let Some(wg) = config else {
        return Ok((Vec::new(), None, None));
    };
    let relay = EndpointRelay::start(socket.clone(), stop.clone());
    let resolver = skylane_shared::resolve::Resolver::from_system();
    let mut tunnels: std::collections::HashMap<String, Arc<WgTunnel>> = Default::default();
    let used = wg
        .connectors
        .iter()
        .map(|c| &c.peer)
        .chain(wg.services.iter().map(|s| &s.peer));
    for name in used {
        if tunnels.contains_key(name) {
            continue;
        }
        let Some(peer) = wg.peers.iter().find(|p| &p.name == name) else {
            continue; // validation checked every reference names a peer
        };
        let ways = relay.as_ref().and_then(|relay| {
            if peer.relays.is_empty() {
                // No way but its own; it still lets other edges relay to its endpoint.
                return Ways::new(relay.clone(), Vec::new(), true);
            }
            let relays = peer
                .relays
                .iter()
                .filter_map(|name| Some((members.by_name(name)?.id.short(), name.clone())))
                .collect();
            Ways::new(relay.clone(), relays, peer.direct)
        });
        let t = WgTunnel::start(peer.clone(), &wg.key, resolver.clone(), ways, stop.clone())
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot start the WireGuard tunnel to {}: {e}", peer.name)
            })?;
        tunnels.insert(name.clone(), t);
    }
    let links = wg
        .connectors
        .iter()
        .filter_map(|c| {
            Some(WgLink::new(
                c.name.clone(),
                c.address,
                tunnels.get(&c.peer)?.clone(),
            ))
        })
        .collect();
    let services: Vec<_> = wg
        .services
        .iter()
        .filter_map(|s| Some((s.service.clone(), tunnels.get(&s.peer)?.clone())))
        .collect();
    let direct = (!services.is_empty()).then(|| Direct::start(services, stop));
    Ok((links, direct, relay))
}

/// What [`start_wireguard`] started: links to connectors behind stock endpoints, the
/// services served through them directly, and the relay of tunnels through other edges.
type WireguardStarted = (
    Vec<WgLink>,
    Option<Direct>,
    Option<Arc<skylane_shared::wireguard::relay::EndpointRelay>>,
);
