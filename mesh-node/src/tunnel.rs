//! Persistent tunnels from this edge to the connectors.
//!
//! One task per connector keeps a QUIC connection up: resolve the connector's address
//! (before every dial, since a dial follows a failure and the connector may have moved),
//! connect, wait until the connection dies, back off with jitter, repeat. Flows take the live tunnel with the
//! lowest round-trip time.
//!
//! Each connector has a *pool* of connections, for two reasons:
//!
//! - Shards ([`skylane_shared::shards`]): a flow takes a connection of its own shard, whose
//!   driver runs on the same thread. A shard without one asks for it (it is dialled from
//!   that shard) and meanwhile uses another shard's.
//! - A QUIC connection carries a bounded number of concurrent streams: when a shard's
//!   connections hold `[tunnel] streams_per_connection` flows each (default
//!   [`STREAMS_PER_CONNECTION`]), another one is opened (up to
//!   [`MAX_CONNECTIONS_PER_CONNECTOR`] in all). An edge is thus limited by its file
//!   descriptors and memory, not by a stream limit; a flow that finds no room within the
//!   open timeout is refused with 503 instead of waiting.
//!
//! Extra connections (all but the first) that have carried nothing for [`EXTRA_IDLE`] are
//! closed again.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use skylane_shared::flow::{self, FlowRecv, FlowSend};
use skylane_shared::identity::NodeKey;
use skylane_shared::identity::ShortId;
use skylane_shared::lifecycle::Backoff;
use skylane_shared::membership::Member;
use skylane_shared::mesh::control::MeshControl;
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::quic::{self, PathStats};
use skylane_shared::resolve::Resolver;
use skylane_shared::shards::Shards;
use skylane_shared::trust::MESH_SERVER_NAME;
use skylane_shared::wireguard::{TunnelStatus, WgTunnel};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Tunnel;

/// Flows one connection carries before another is opened, by default: below the peer's
/// stream limit ([`quic::MAX_CONCURRENT_STREAMS`]), so opening a stream never waits for
/// credit.
pub const STREAMS_PER_CONNECTION: usize = 8_000;
/// Connections to one connector at most (over 250 000 concurrent flows).
pub const MAX_CONNECTIONS_PER_CONNECTOR: usize = 32;
/// An extra connection idle this long is closed.
pub const EXTRA_IDLE: Duration = Duration::from_secs(60);
/// How long after a connector's tunnel dropped a flow that finds no tunnel up waits for it
/// to come back, rather than failing at once (never past the open timeout). A connector
/// that restarts is back within a second or two, and the edge redials at once; a dead one
/// costs the flows of these few seconds a wait before their error, and later flows none.
pub const RECONNECT_HOLD: Duration = Duration::from_secs(3);

/// One QUIC connection of a connector's pool, and the flows it carries.
#[derive(Clone, Debug)]
struct Pooled {
    conn: quinn::Connection,
    /// The shard whose thread drives it ([`skylane_shared::shards`]): that shard's requests use it
    /// first.
    shard: usize,
    open: Arc<AtomicUsize>,
    /// Set once the connection was seen closed. A request checks this flag, not quinn's
    /// [`quinn::Connection::close_reason`]: that takes the connection's lock, which the
    /// connection's driver holds while it works, and under load two or three such checks
    /// per request made threads wait for each other (the edge's futex waits, 2026-12-07).
    closed: Arc<AtomicBool>,
    /// Consecutive idle checks that found it carrying nothing.
    quiet_checks: u8,
    /// Its place in the order its connector's connections were dialled (the link's
    /// `dialled` counter): every connection dialled before one whose connector process
    /// said it hands over reaches that same old process.
    dialled: u64,
    /// Set when the connector process behind it hands over to a successor
    /// ([`TunnelPool::retire`]): it takes no new flows, and the pool dials a new connection,
    /// which reaches the successor. Its flows in flight go on until the old process ends it.
    retired: Arc<AtomicBool>,
}

impl Pooled {
    fn new(conn: quinn::Connection, shard: usize, dialled: u64) -> Self {
        Self {
            conn,
            shard,
            open: Arc::new(AtomicUsize::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
            quiet_checks: 0,
            dialled,
            retired: Arc::new(AtomicBool::new(false)),
        }
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Whether new flows may use it: not seen closed, not retired.
    fn takes_flows(&self) -> bool {
        self.not_seen_closed() && !self.retired()
    }

    /// Whether the connection is open, asked of quinn (and remembered when it is not).
    /// For the pool's own checks; a request uses [`Pooled::not_seen_closed`].
    fn alive(&self) -> bool {
        !closed_now(&self.conn, &self.closed)
    }

    /// Whether the connection was not seen closed yet. A closed one is seen by the
    /// first stream that fails to open on it, by the task that keeps the first connection
    /// up, and by the pool's idle check.
    fn not_seen_closed(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }
}

/// Whether `conn` is closed, asked of quinn; remembered in `seen` when it is.
fn closed_now(conn: &quinn::Connection, seen: &AtomicBool) -> bool {
    let closed = conn.close_reason().is_some();
    if closed {
        seen.store(true, Ordering::Relaxed);
    }
    closed
}

/// A flow's stream slot on a pooled connection, given back when the flow ends.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream opened for one flow.
#[derive(Debug)]
pub struct TunnelStream {
    /// The connector it goes to.
    pub connector: String,
    /// Its sending half.
    pub send: FlowSend,
    /// Its receiving half.
    pub recv: FlowRecv,
    /// Its place on the connection: keep it as long as the flow.
    pub slot: StreamSlot,
    /// Which of its connector's pooled QUIC connections it is on, by the order they were
    /// dialled, for [`TunnelPool::retire`]; `None` for a flow that is not on one.
    pub dialled: Option<u64>,
}

/// Why no stream could be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No tunnel to any connector is up.
    NoTunnel,
    /// Tunnels are up but full, and no room came within the open timeout.
    Saturated,
}

/// One connector and its tunnels, if up.
#[derive(Debug)]
pub struct ConnectorLink {
    /// The connector.
    pub member: Member,
    state: RwLock<LinkState>,
    /// Asks the pool task for another connection.
    grow: Notify,
    /// Told when a connection was added.
    grown: Notify,
    /// Flows per connection before the pool grows.
    per_connection: usize,
    /// Shards whose requests found no connection of their own with room (bit `i` for
    /// shard `i`; shards from 64 up have none of their own and use the others').
    wanted: AtomicU64,
    /// Until when (ms on [`crate::phases::connection::now_ms`]'s clock) the connector said
    /// it is draining: new flows go elsewhere first. Cleared when a new tunnel comes up.
    draining_until_ms: AtomicU64,
    /// Connections dialled so far: numbers them in order ([`Pooled`]'s `dialled`).
    dialled: AtomicU64,
    /// Stops its dial and pool tasks when a reload removes the connector.
    stop: CancellationToken,
}

/// How long a connector that refused a flow as draining is passed over.
const DRAINING_HOLD_MS: u64 = 30_000;

#[derive(Debug, Default)]
struct LinkState {
    /// The live connections; the first is the one the dial loop keeps up.
    conns: Vec<Pooled>,
    since: Option<Instant>,
    /// When the tunnel last dropped; cleared when it is up again.
    dropped_at: Option<Instant>,
    last_error: Option<String>,
    reconnects: u64,
}

impl ConnectorLink {
    /// A connection with room for one more flow, with that place taken, and its closed
    /// flag (for the caller to set when the stream fails to open because it is closed).
    /// One of `shard`'s own if it has one with room; if not, another shard's, and the pool
    /// is asked for one of its own (to open from that shard, see [`grow_pool`]).
    fn take_slot(
        &self,
        shard: usize,
    ) -> Option<(quinn::Connection, StreamSlot, Arc<AtomicBool>, u64)> {
        let s = self.state.read().ok()?;
        let room =
            |p: &&Pooled| p.takes_flows() && p.open.load(Ordering::Relaxed) < self.per_connection;
        let p = match s.conns.iter().filter(room).find(|p| p.shard == shard) {
            Some(p) => p,
            None => {
                if shard < 64 {
                    self.wanted.fetch_or(1 << shard, Ordering::Relaxed);
                    self.grow.notify_one();
                }
                s.conns.iter().find(room)?
            }
        };
        p.open.fetch_add(1, Ordering::Relaxed);
        Some((
            p.conn.clone(),
            StreamSlot(p.open.clone()),
            p.closed.clone(),
            p.dialled,
        ))
    }

    fn primary(&self) -> Option<quinn::Connection> {
        let s = self.state.read().ok()?;
        s.conns.iter().find(|p| p.alive()).map(|p| p.conn.clone())
    }

    /// The first connection not seen closed: the request path's form of
    /// [`ConnectorLink::primary`], which asks quinn.
    fn first_not_seen_closed(&self) -> Option<quinn::Connection> {
        let s = self.state.read().ok()?;
        s.conns
            .iter()
            .find(|p| p.not_seen_closed())
            .map(|p| p.conn.clone())
    }

    /// The wait left for its tunnel to come back: some while it dropped less than
    /// [`RECONNECT_HOLD`] ago and no connection is up.
    fn reconnect_hold_left(&self) -> Option<Duration> {
        let s = self.state.read().ok()?;
        if s.conns.iter().any(Pooled::not_seen_closed) {
            return None;
        }
        let left = RECONNECT_HOLD.checked_sub(s.dropped_at?.elapsed())?;
        (!left.is_zero()).then_some(left)
    }

    fn flows(&self) -> usize {
        self.state
            .read()
            .map(|s| s.conns.iter().map(|p| p.open.load(Ordering::Relaxed)).sum())
            .unwrap_or(0)
    }
}

/// A connector behind a stock WireGuard endpoint: each flow is a TCP connection through
/// the endpoint's tunnel to the connector's WireGuard address.
#[derive(Debug)]
pub struct WgLink {
    /// The connector's name.
    pub name: String,
    /// Its address inside the tunnel.
    pub address: std::net::SocketAddr,
    /// The tunnel to the endpoint it is behind (shared by the connectors behind it).
    pub tunnel: Arc<WgTunnel>,
    /// The connector's member id, when the tunnel runs over the mesh (routing knows it).
    pub member: Option<skylane_shared::identity::ShortId>,
    flows: Arc<AtomicUsize>,
    draining_until_ms: AtomicU64,
}

impl WgLink {
    /// A link to the connector `name` at `address` through `tunnel`.
    pub fn new(name: String, address: std::net::SocketAddr, tunnel: Arc<WgTunnel>) -> Self {
        Self {
            name,
            address,
            tunnel,
            member: None,
            flows: Arc::new(AtomicUsize::new(0)),
            draining_until_ms: AtomicU64::new(0),
        }
    }

    /// A link to a mesh connector with `transport = "wireguard"`, through `tunnel` over
    /// the mesh socket.
    pub fn over_mesh(member: &Member, tunnel: Arc<WgTunnel>) -> Self {
        Self {
            member: Some(member.id.short()),
            ..Self::new(
                member.name.clone(),
                skylane_shared::wireguard::mesh::connector_flow_addr(),
                tunnel,
            )
        }
    }
}

/// Services this edge serves itself, reaching their servers through WireGuard with the
/// connector's own forwarding (pooled connections, health checks, failover across
/// servers): a flow to one is a pipe to an in-process forwarder, not a tunnel stream.
#[derive(Debug)]
pub struct Direct {
    ctx: origin_connector::forward::Context,
    /// Each service and the tunnel its servers are behind.
    services: Vec<(Arc<origin_connector::origin::ServicePool>, Arc<WgTunnel>)>,
    flows: Arc<AtomicUsize>,
}

/// The name flows to [`Direct`] services go under (logs, retries).
pub const DIRECT: &str = "direct";

/// Bytes a pipe to the in-process forwarder buffers each way.
const DIRECT_PIPE: usize = 64 * 1024;

impl Direct {
    /// The forwarder for `services`; health checks start on `tracker` until `stop`.
    pub fn start(
        services: Vec<(origin_connector::config::Service, Arc<WgTunnel>)>,
        stop: CancellationToken,
    ) -> Self {
        use origin_connector::dial::Dial;
        use origin_connector::origin::ServicePool;
        let resolver = Resolver::from_system();
        let tracker = tokio_util::task::TaskTracker::new();
        let services: Vec<_> = services
            .into_iter()
            .map(|(service, tunnel)| {
                let pool = Arc::new(ServicePool::with_dial(
                    service,
                    Dial::Wireguard(tunnel.clone()),
                ));
                pool.spawn_health_checks(resolver.clone(), stop.clone(), &tracker);
                (pool, tunnel)
            })
            .collect();
        let lookup: std::collections::BTreeMap<String, Arc<ServicePool>> = services
            .iter()
            .map(|(p, _)| (p.service.name.clone(), p.clone()))
            .collect();
        Self {
            ctx: origin_connector::forward::Context {
                services: Arc::new(lookup),
                resolver,
                // The edge drains its own clients; the forwarder never refuses as draining.
                draining: CancellationToken::new(),
                restarting: Arc::default(),
                pipes: tracker,
            },
            services,
            flows: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn serves(&self, service: &str) -> bool {
        self.services.iter().any(|(p, _)| p.service.name == service)
    }

    fn open(&self) -> TunnelStream {
        let (ours, theirs) = tokio::io::duplex(DIRECT_PIPE);
        let (send, recv) = flow::from_pipe(theirs);
        tokio::spawn(origin_connector::forward::handle_stream(
            self.ctx.clone(),
            Arc::from(DIRECT),
            send,
            recv,
        ));
        let (send, recv) = flow::from_pipe(ours);
        self.flows.fetch_add(1, Ordering::Relaxed);
        TunnelStream {
            connector: DIRECT.into(),
            send,
            recv,
            slot: StreamSlot(self.flows.clone()),
            dialled: None,
        }
    }
}

/// A connector a flow may go to, of either transport.
#[derive(Clone)]
enum Candidate<'a> {
    Quic(Arc<ConnectorLink>),
    Wg(&'a WgLink),
}

impl Candidate<'_> {
    fn draining_until_ms(&self) -> u64 {
        match self {
            Self::Quic(l) => l.draining_until_ms.load(Ordering::Relaxed),
            Self::Wg(l) => l.draining_until_ms.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of one tunnel for the status page.
#[derive(Debug, serde::Serialize)]
pub struct LinkStatus {
    /// Connector name.
    pub connector: String,
    /// `quic` (a mesh tunnel) or `wireguard` (through a WireGuard endpoint).
    pub transport: &'static str,
    /// The WireGuard tunnel's state, for a connector behind one.
    pub wireguard: Option<TunnelStatus>,
    /// Whether the tunnel is up.
    pub up: bool,
    /// Where its datagrams go.
    pub address: Option<String>,
    /// Smoothed RTT of the tunnel.
    pub rtt_ms: Option<f64>,
    /// QUIC path statistics of the live tunnel (congestion window, losses, packet size):
    /// what to look at when a tunnel is slower than its RTT explains.
    pub quic: Option<PathStats>,
    /// Seconds since it came up.
    pub up_for_s: Option<u64>,
    /// Times it has been re-established.
    pub reconnects: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// QUIC connections in the pool.
    pub connections: usize,
    /// Flows it carries now.
    pub flows: usize,
    /// Whether the connector refused a flow as draining lately (new flows go elsewhere).
    pub draining: bool,
}

impl LinkStatus {
    /// The entry of a connector (or a direct service) behind a WireGuard tunnel.
    fn wireguard(
        connector: String,
        wg: TunnelStatus,
        up: bool,
        connections: usize,
        flows: usize,
        draining: bool,
    ) -> Self {
        Self {
            connector,
            transport: "wireguard",
            up,
            address: wg.endpoint.clone(),
            rtt_ms: wg.rtt_ms.filter(|_| wg.up).map(f64::from),
            quic: None,
            up_for_s: None,
            reconnects: 0,
            last_error: wg.last_error.clone(),
            connections,
            flows,
            draining,
            wireguard: Some(wg),
        }
    }
}

/// The tunnels of this edge.
pub struct TunnelPool {
    /// Connectors over the mesh; a reload may add or remove some.
    links: arc_swap::ArcSwap<Vec<Arc<ConnectorLink>>>,
    wg: Vec<WgLink>,
    direct: Option<Direct>,
    socket: Arc<MeshSocket>,
    control: Arc<MeshControl>,
    /// Starts the tasks of a connector a reload adds.
    dialer: Arc<Dialer>,
    streams_per_connection: usize,
    stop: CancellationToken,
}

impl std::fmt::Debug for TunnelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelPool")
            .field("connectors", &self.links.load().len())
            .finish_non_exhaustive()
    }
}

impl TunnelPool {
    /// Starts one reconnecting task and one pool task per mesh connector; `wg` are the
    /// connectors behind WireGuard endpoints, their tunnels already started.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        endpoint: quinn::Endpoint,
        socket: Arc<MeshSocket>,
        control: Arc<MeshControl>,
        key: NodeKey,
        connectors: Vec<Member>,
        wg: Vec<WgLink>,
        direct: Option<Direct>,
        timing: Tunnel,
        shards: Arc<Shards>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let streams_per_connection = timing.streams_per_connection;
        let dialer = Arc::new(Dialer {
            endpoint,
            socket: socket.clone(),
            control: control.clone(),
            key,
            timing,
            resolver: Resolver::from_system(),
            shards,
        });
        let pool = Arc::new(Self {
            links: arc_swap::ArcSwap::from_pointee(Vec::new()),
            wg,
            direct,
            socket,
            control,
            dialer,
            streams_per_connection,
            stop,
        });
        let links: Vec<_> = connectors.into_iter().map(|m| pool.launch(m)).collect();
        pool.links.store(Arc::new(links));
        pool
    }

    /// A link to `member`, with its dial and pool tasks running.
    fn launch(&self, member: Member) -> Arc<ConnectorLink> {
        let link = Arc::new(ConnectorLink {
            member,
            state: RwLock::new(LinkState::default()),
            grow: Notify::new(),
            grown: Notify::new(),
            per_connection: self.streams_per_connection,
            wanted: AtomicU64::new(0),
            draining_until_ms: AtomicU64::new(0),
            dialled: AtomicU64::new(0),
            stop: self.stop.child_token(),
        });
        tokio::spawn(keep_up(
            link.clone(),
            self.dialer.clone(),
            link.stop.clone(),
        ));
        tokio::spawn(grow_pool(
            link.clone(),
            self.dialer.clone(),
            link.stop.clone(),
        ));
        link
    }

    /// Puts a new member list in force (a reload): the mesh takes it (see
    /// [`MeshControl::set_members`]), tunnels to added connectors start, and those to
    /// removed ones close, after the flows on them had `grace` to end. A connector still
    /// in the list keeps its tunnels even if its address changed (the next dial uses it).
    pub fn set_members(
        &self,
        members: skylane_shared::membership::Members,
        connectors: &[Member],
        grace: Duration,
    ) -> Result<skylane_shared::mesh::control::MemberChanges, String> {
        let changes = self
            .control
            .set_members(members)
            .map_err(|e| e.to_string())?;
        let old = self.links.load_full();
        let mut next: Vec<Arc<ConnectorLink>> = Vec::new();
        for member in connectors {
            match old.iter().find(|l| l.member.id == member.id) {
                Some(kept) => next.push(kept.clone()),
                None => {
                    tracing::info!(connector = %member.name, "tunnel to a connector the reload added");
                    next.push(self.launch(member.clone()));
                }
            }
        }
        for gone in old
            .iter()
            .filter(|l| !next.iter().any(|n| n.member.id == l.member.id))
        {
            tracing::info!(connector = %gone.member.name, "closing the tunnels to a connector the reload removed");
            let gone = gone.clone();
            tokio::spawn(async move {
                // New flows no longer pick it; the ones on it get the drain time.
                tokio::time::sleep(grace).await;
                gone.stop.cancel();
                if let Ok(s) = gone.state.read() {
                    for p in &s.conns {
                        p.conn
                            .close(0u32.into(), b"connector removed from the mesh");
                    }
                }
            });
        }
        self.links.store(Arc::new(next));
        Ok(changes)
    }

    /// Connectors with a live tunnel, in the order new flows try them: not draining
    /// first, then the one routing prefers (it moves only when another is clearly
    /// cheaper, so flows do not flap between connectors), then by RTT. `exclude`: names
    /// already tried by this flow. Connectors behind WireGuard have no mesh route, so
    /// routing never prefers them; they come by RTT after the preferred one.
    fn live(&self, exclude: &[String]) -> Vec<Candidate<'_>> {
        let preferred = self.control.preferred_destination();
        let now = crate::phases::connection::now_ms();
        let links = self.links.load_full();
        // The RTT orders connectors; with one there is nothing to order, and asking
        // quinn for it takes the connection's lock.
        let several = links.len() + self.wg.len() > 1;
        let quic = links
            .iter()
            .filter(|l| !exclude.contains(&l.member.name))
            .filter_map(|l| {
                let conn = l.first_not_seen_closed()?;
                let rtt = if several { conn.rtt() } else { Duration::ZERO };
                Some((
                    Candidate::Quic(l.clone()),
                    Some(l.member.id.short()) == preferred,
                    rtt,
                ))
            })
            .collect::<Vec<_>>();
        let wg = self
            .wg
            .iter()
            .filter(|l| !exclude.contains(&l.name) && l.tunnel.is_up())
            .map(|l| {
                let rtt = l.tunnel.rtt().unwrap_or(Duration::from_secs(1));
                (
                    Candidate::Wg(l),
                    l.member.is_some() && l.member == preferred,
                    rtt,
                )
            });
        let mut v: Vec<_> = quic.into_iter().chain(wg).collect();
        v.sort_by_key(|(c, preferred, rtt)| (c.draining_until_ms() > now, !*preferred, *rtt));
        v.into_iter().map(|(c, _, _)| c).collect()
    }

    /// Resolves when `connector` loses its last route while it had one when this was
    /// called (the connector died or is cut off); never, if it had none then (a tunnel
    /// whose route is still being set up is not given up on).
    pub async fn route_lost(&self, connector: &str) {
        let quic = self
            .links
            .load()
            .iter()
            .find(|l| l.member.name == connector)
            .map(|l| l.member.id.short());
        let wg = self
            .wg
            .iter()
            .find(|l| l.name == connector)
            .and_then(|l| l.member);
        let Some(id) = quic.or(wg) else {
            return std::future::pending().await;
        };
        if !self.control.has_route(&id) {
            return std::future::pending().await;
        }
        until_routes(&self.control, |c| !c.has_route(&id)).await
    }

    /// `connector`'s process said, on its connection numbered `dialled`, that it hands over
    /// to a successor. That connection and every one dialled before it reach the same old
    /// process: they take no new flows, and the next flow that finds no other connection
    /// with room has the pool dial one, which reaches the successor.
    pub fn retire(&self, connector: &str, dialled: u64) {
        let links = self.links.load_full();
        let Some(link) = links.iter().find(|l| l.member.name == connector) else {
            return;
        };
        let Ok(s) = link.state.read() else {
            return;
        };
        let mut retired = 0u64;
        for p in s.conns.iter().filter(|p| p.dialled <= dialled) {
            if !p.retired.swap(true, Ordering::Relaxed) {
                retired += 1;
            }
        }
        if retired > 0 {
            tracing::info!(%connector, connections = retired, "the connector hands over to a successor process; opening a new tunnel connection");
            metrics::counter!("skylane_tunnel_retired_total", "connector" => connector.to_owned())
                .increment(retired);
        }
    }

    /// Notes that `connector` refused a flow because it is draining: new flows go to the
    /// other connectors first for a while.
    pub fn mark_draining(&self, connector: &str) {
        let until = crate::phases::connection::now_ms() + DRAINING_HOLD_MS;
        if let Some(l) = self
            .links
            .load()
            .iter()
            .find(|l| l.member.name == connector)
        {
            l.draining_until_ms.store(until, Ordering::Relaxed);
        }
        if let Some(l) = self.wg.iter().find(|l| l.name == connector) {
            l.draining_until_ms.store(until, Ordering::Relaxed);
        }
    }

    /// Opens a stream on the best tunnel with room (see [`TunnelPool::live`] for the
    /// order), falling back to the others; never to a connector named in `exclude`. When
    /// every connection is full it asks for another one and waits for it, at most
    /// `timeout`. When no tunnel is up but one dropped moments ago, it waits for that one
    /// to come back, as long as [`RECONNECT_HOLD`] and `timeout` allow.
    pub async fn open_stream(
        &self,
        timeout: Duration,
        exclude: &[String],
        service: &str,
    ) -> Result<TunnelStream, OpenError> {
        if let Some(direct) = self.direct.as_ref().filter(|d| d.serves(service)) {
            // Served here: connectors do not have it.
            if exclude.iter().any(|e| e == DIRECT) {
                return Err(OpenError::NoTunnel);
            }
            return Ok(direct.open());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // WireGuard connectors that failed to connect for this flow: not tried again.
        let mut failed: Vec<String> = exclude.to_vec();
        loop {
            let live = self.live(&failed);
            if live.is_empty() {
                self.wait_for_reconnect(&failed, deadline).await?;
                continue;
            }
            let mut waiting = Vec::new();
            for candidate in &live {
                let link = match candidate {
                    Candidate::Quic(link) => link,
                    Candidate::Wg(link) => {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        match link.tunnel.connect(link.address, left).await {
                            Ok(tcp) => {
                                link.flows.fetch_add(1, Ordering::Relaxed);
                                let (send, recv) = flow::from_wireguard(tcp);
                                return Ok(TunnelStream {
                                    connector: link.name.clone(),
                                    send,
                                    recv,
                                    slot: StreamSlot(link.flows.clone()),
                                    dialled: None,
                                });
                            }
                            Err(e) => {
                                tracing::debug!(connector = %link.name, error = %e, "flow through WireGuard failed; trying another tunnel");
                                failed.push(link.name.clone());
                                continue;
                            }
                        }
                    }
                };
                let Some((conn, slot, closed, dialled)) =
                    link.take_slot(skylane_shared::shards::current())
                else {
                    link.grow.notify_one();
                    waiting.push(link);
                    continue;
                };
                match tokio::time::timeout_at(deadline, conn.open_bi()).await {
                    Ok(Ok(halves)) => {
                        let (send, recv) = flow::from_quic(halves);
                        return Ok(TunnelStream {
                            connector: link.member.name.clone(),
                            send,
                            recv,
                            slot,
                            dialled: Some(dialled),
                        });
                    }
                    Ok(Err(e)) => {
                        closed_now(&conn, &closed);
                        tracing::debug!(connector = %link.member.name, error = %e, "stream open failed; trying another tunnel")
                    }
                    Err(_) => return Err(OpenError::Saturated),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(OpenError::Saturated);
            }
            // Every pool is full: wait for one to grow (or a flow to end), not past the
            // deadline.
            if !wait_for_growth(&waiting, deadline).await {
                return Err(OpenError::Saturated);
            }
        }
    }

    /// With no tunnel up: waits until one of the connectors whose tunnel dropped moments
    /// ago (see [`RECONNECT_HOLD`]), not in `exclude`, may be back; `NoTunnel` when there is
    /// none, or when none came back within its hold and `deadline`.
    async fn wait_for_reconnect(
        &self,
        exclude: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<(), OpenError> {
        let links = self.links.load_full();
        let mut longest = Duration::ZERO;
        let mut dropped = Vec::new();
        for link in links.iter().filter(|l| !exclude.contains(&l.member.name)) {
            if let Some(left) = link.reconnect_hold_left() {
                longest = longest.max(left);
                dropped.push(link);
            }
        }
        if dropped.is_empty() {
            return Err(OpenError::NoTunnel);
        }
        let until = deadline.min(tokio::time::Instant::now() + longest);
        if wait_for_growth(&dropped, until).await {
            Ok(())
        } else {
            Err(OpenError::NoTunnel)
        }
    }

    /// Whether any tunnel is up.
    pub fn any_up(&self) -> bool {
        self.up_count() > 0
    }

    /// How many connectors this edge has a tunnel up to.
    pub fn up_count(&self) -> usize {
        self.links
            .load()
            .iter()
            .filter(|l| l.primary().is_some())
            .count()
            + self.wg.iter().filter(|l| l.tunnel.is_up()).count()
            + self
                .direct
                .as_ref()
                .map_or(0, |d| d.services.iter().filter(|(_, t)| t.is_up()).count())
    }

    /// How many connectors this edge tunnels to (up or not); services it serves itself
    /// count as one.
    pub fn connector_count(&self) -> usize {
        self.links.load().len() + self.wg.len() + usize::from(self.direct.is_some())
    }

    /// Status of every tunnel.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links
            .load()
            .iter()
            .map(|l| {
                let flows = l.flows();
                let s = l.state.read();
                let (up, rtt, quic, since, reconnects, last_error, connections) = match &s {
                    Ok(s) => {
                        let live = s.conns.iter().find(|p| p.alive()).map(|p| &p.conn);
                        (
                            live.is_some(),
                            live.map(|c| c.rtt().as_secs_f64() * 1000.0),
                            live.map(PathStats::of),
                            s.since
                                .filter(|_| live.is_some())
                                .map(|t| t.elapsed().as_secs()),
                            s.reconnects,
                            s.last_error.clone(),
                            s.conns.iter().filter(|p| p.alive()).count(),
                        )
                    }
                    Err(_) => (false, None, None, None, 0, None, 0),
                };
                LinkStatus {
                    connector: l.member.name.clone(),
                    transport: "quic",
                    wireguard: None,
                    up,
                    address: self.socket.peer_addr(&l.member.id).map(|a| a.to_string()),
                    rtt_ms: rtt,
                    quic,
                    up_for_s: since,
                    reconnects,
                    last_error,
                    connections,
                    flows,
                    draining: l.draining_until_ms.load(Ordering::Relaxed)
                        > crate::phases::connection::now_ms(),
                }
            })
            .chain(self.wg.iter().map(|l| {
                let wg = l.tunnel.status();
                let up = wg.up;
                LinkStatus::wireguard(
                    l.name.clone(),
                    wg,
                    up,
                    usize::from(up),
                    l.flows.load(Ordering::Relaxed),
                    l.draining_until_ms.load(Ordering::Relaxed)
                        > crate::phases::connection::now_ms(),
                )
            }))
            .chain(self.direct.iter().flat_map(|d| {
                d.services.iter().map(|(pool, tunnel)| {
                    let wg = tunnel.status();
                    let servers_up = pool.servers.iter().filter(|s| s.is_up()).count();
                    let up = wg.up && servers_up > 0;
                    LinkStatus::wireguard(
                        format!("{} ({DIRECT})", pool.service.name),
                        wg,
                        up,
                        servers_up,
                        d.flows.load(Ordering::Relaxed),
                        false,
                    )
                })
            }))
            .collect()
    }
}

/// What every connector's dial loop shares.
struct Dialer {
    endpoint: quinn::Endpoint,
    socket: Arc<MeshSocket>,
    control: Arc<MeshControl>,
    key: NodeKey,
    timing: Tunnel,
    resolver: Resolver,
    /// Each connection is dialled from the shard that will use it.
    shards: Arc<Shards>,
}

/// Why a dial failed.
enum DialError {
    /// The TLS config could not be built: retrying will not help.
    Config(String),
    /// The handshake failed or timed out.
    Failed(String),
}

impl Dialer {
    /// Opens one QUIC connection to `member` (its address must be known to the socket),
    /// driven on `shard`.
    async fn connect(&self, member: &Member, shard: usize) -> Result<quinn::Connection, DialError> {
        let config = quic::client_config(&self.key, member.id)
            .map_err(|e| DialError::Config(e.to_string()))?;
        // quinn spawns the connection's driver when the connection is made, on the runtime
        // of the caller's context.
        let connecting = self
            .shards
            .within(shard, || {
                self.endpoint
                    .connect_with(config, virtual_addr(&member.id), MESH_SERVER_NAME)
            })
            .map_err(|e| DialError::Failed(e.to_string()))?;
        match tokio::time::timeout(self.timing.connect_timeout, connecting).await {
            Ok(Ok(c)) => {
                self.control.watch_connection(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(DialError::Failed(e.to_string())),
            Err(_) => Err(DialError::Failed("handshake timed out".into())),
        }
    }
}

/// Opens extra connections to a connector for the shards that asked for one: a shard
/// without a connection of its own, or whose connections are full. Closes extra ones that
/// sat idle.
async fn grow_pool(link: Arc<ConnectorLink>, dialer: Arc<Dialer>, stop: CancellationToken) {
    let name = link.member.name.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.grow.notified() => {}
            _ = tokio::time::sleep(EXTRA_IDLE / 4) => {
                close_idle_extras(&link);
                continue;
            }
        }
        let wanted = link.wanted.swap(0, Ordering::Relaxed);
        for shard in (0..64).filter(|i| wanted & (1 << i) != 0) {
            let count = match link.state.read() {
                Ok(s) => {
                    let live: Vec<&Pooled> = s.conns.iter().filter(|p| p.alive()).collect();
                    let has_room = live.iter().any(|p| {
                        p.shard == shard
                            && !p.retired()
                            && p.open.load(Ordering::Relaxed) < link.per_connection
                    });
                    // No connection at all: the dial loop brings the first one up. (Only
                    // retired ones: this dials the successor's.)
                    if live.is_empty() || has_room {
                        continue;
                    }
                    // Retired connections leave with their old process: they do not count
                    // against the cap, or a full pool could never be replaced.
                    live.iter().filter(|p| !p.retired()).count()
                }
                Err(_) => continue,
            };
            if count >= MAX_CONNECTIONS_PER_CONNECTOR {
                break;
            }
            match dialer.connect(&link.member, shard).await {
                Ok(conn) => {
                    tracing::info!(connector = %name, connections = count + 1, shard, "tunnel pool grew");
                    metrics::counter!("skylane_tunnel_pool_grown_total", "connector" => name.clone())
                        .increment(1);
                    if let Ok(mut s) = link.state.write() {
                        let dialled = link.dialled.fetch_add(1, Ordering::Relaxed);
                        s.conns.push(Pooled::new(conn, shard, dialled));
                    }
                    link.grown.notify_waiters();
                }
                Err(DialError::Config(e) | DialError::Failed(e)) => {
                    tracing::warn!(connector = %name, error = %e, "extra tunnel connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Closes extra (not first) connections that carried nothing for [`EXTRA_IDLE`] (four
/// checks in a row), keeping the pool as small as the load.
fn close_idle_extras(link: &ConnectorLink) {
    let Ok(mut s) = link.state.write() else {
        return;
    };
    // The first connection is kept however idle; while a retired one (its connector
    // process hands over) is first, so is the first that is not.
    let keep = s.conns.iter().position(|p| !p.retired());
    let mut index = 0;
    s.conns.retain_mut(|p| {
        let first = index == 0 || Some(index) == keep;
        index += 1;
        if !p.alive() {
            return false;
        }
        if first || p.open.load(Ordering::Relaxed) > 0 {
            p.quiet_checks = 0;
            return true;
        }
        p.quiet_checks += 1;
        if p.quiet_checks < 4 {
            return true;
        }
        p.conn.close(0u32.into(), b"idle extra connection");
        false
    });
}

async fn keep_up(link: Arc<ConnectorLink>, dialer: Arc<Dialer>, stop: CancellationToken) {
    let Dialer {
        socket,
        timing,
        resolver,
        ..
    } = &*dialer;
    let name = link.member.name.clone();
    let mut backoff = Backoff::new(timing.reconnect_min, timing.reconnect_max);
    let mut first = true;
    loop {
        if !first {
            let delay = backoff.next_delay();
            tracing::debug!(connector = %name, delay_ms = delay.as_millis() as u64, "reconnecting after a pause");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        match &link.member.address {
            // Resolve the connector's address before every dial: a dial follows a failure,
            // and a failed tunnel may mean the connector moved.
            Some(target) => match resolver.resolve(target).await {
                Ok(r) => socket.set_peer_addr(&link.member.id, r.addrs[0]),
                Err(e) => {
                    set_error(&link, e.to_string());
                    tracing::warn!(connector = %name, error = %e, "cannot resolve connector");
                    continue;
                }
            },
            // A connector that dials out has no address in the config: the mesh socket
            // learns it from the connector's own authenticated frames (its probes), which
            // also open the way back through its firewall or NAT.
            None => {
                let learned = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = wait_for_learned(socket, &link.member.id) => a,
                };
                tracing::debug!(connector = %name, address = %learned, "dialling a connector at the address it dialled out from");
            }
        }
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = dialer.connect(&link.member, 0) => match r {
                Ok(c) => c,
                Err(DialError::Config(e)) => {
                    tracing::error!(connector = %name, error = %e, "bad tunnel TLS config");
                    return;
                }
                Err(DialError::Failed(e)) => {
                    tracing::warn!(connector = %name, error = %e, "tunnel handshake failed");
                    set_error(&link, e);
                    continue;
                }
            },
        };
        backoff.reset();
        tracing::info!(connector = %name, rtt_ms = conn.rtt().as_millis() as u64, "tunnel up");
        metrics::gauge!("skylane_tunnel_up", "connector" => name.clone()).set(1.0);
        if let Ok(mut s) = link.state.write() {
            if s.since.is_some() {
                s.reconnects += 1;
            }
            s.conns.retain(Pooled::alive);
            let dialled = link.dialled.fetch_add(1, Ordering::Relaxed);
            s.conns.insert(0, Pooled::new(conn.clone(), 0, dialled));
            s.since = Some(Instant::now());
            s.dropped_at = None;
        }
        // A new tunnel is a new connector process: no longer draining.
        link.draining_until_ms.store(0, Ordering::Relaxed);
        link.grown.notify_waiters();
        let reason = tokio::select! {
            _ = stop.cancelled() => {
                conn.close(0u32.into(), b"edge shutting down");
                return;
            }
            r = conn.closed() => r,
            () = abandoned(&dialer.control, link.member.id.short()) => {
                tracing::warn!(connector = %name, "no path to the connector is left and another serves; closing its tunnels so their flows end now");
                if let Ok(s) = link.state.read() {
                    for p in &s.conns {
                        p.conn.close(CONNECTOR_LOST, b"connector lost");
                    }
                }
                conn.closed().await
            }
        };
        metrics::gauge!("skylane_tunnel_up", "connector" => name.clone()).set(0.0);
        metrics::counter!("skylane_tunnel_drops_total", "connector" => name.clone()).increment(1);
        tracing::warn!(connector = %name, reason = %reason, "tunnel down");
        set_error(&link, reason.to_string());
        if let Ok(mut s) = link.state.write() {
            s.conns
                .retain(|p| p.alive() && p.conn.stable_id() != conn.stable_id());
            s.dropped_at = Some(Instant::now());
        }
        // Reconnect at once the first time; back off if it keeps failing.
        first = true;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until one of `links` gains a connection (its `grown` is told), or 20 ms pass (which
/// also covers a flow that ended, and a connection that came up before this task was
/// listening); false when `until` came first.
async fn wait_for_growth(links: &[&Arc<ConnectorLink>], until: tokio::time::Instant) -> bool {
    let grown = async {
        if links.is_empty() {
            return std::future::pending().await;
        }
        futures_util::future::select_all(links.iter().map(|l| Box::pin(l.grown.notified()))).await;
    };
    tokio::select! {
        _ = grown => true,
        _ = tokio::time::sleep(Duration::from_millis(20)) => true,
        _ = tokio::time::sleep_until(until) => false,
    }
}

/// Application close code of tunnels to a connector routing lost.
const CONNECTOR_LOST: quinn::VarInt = quinn::VarInt::from_u32(2);

/// Resolves when routing, having had a path to connector `id`, has none left while another
/// connector has one. The connector died or is cut off from this edge; its flows (a
/// websocket, a TCP connection) cannot move to another connector and would hang until
/// QUIC's idle timeout, while their users, once disconnected, reconnect through the other
/// connector at once. With no other connector there is nowhere better, so the tunnel waits
/// for the path to come back within the idle timeout instead.
async fn abandoned(control: &MeshControl, id: ShortId) {
    let mut had_route = false;
    until_routes(control, |c| {
        let routed = c.has_route(&id);
        had_route |= routed;
        // The preferred destination is set before the route changes that move it are
        // announced, and another connector gaining a route is such a change.
        had_route && !routed && c.preferred_destination().is_some_and(|other| other != id)
    })
    .await
}

/// Resolves once `done` holds, checked now and at every route change; never if the mesh
/// stops announcing them.
async fn until_routes(control: &MeshControl, mut done: impl FnMut(&MeshControl) -> bool) {
    let mut changes = control.route_changes();
    while !done(control) {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Waits until the mesh socket knows where `member` is (it learns the address of a member
/// with none configured from its authenticated frames).
async fn wait_for_learned(
    socket: &MeshSocket,
    member: &skylane_shared::identity::NodeId,
) -> std::net::SocketAddr {
    loop {
        if let Some(addr) = socket.peer_addr(member) {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn set_error(link: &ConnectorLink, e: String) {
    if let Ok(mut s) = link.state.write() {
        s.last_error = Some(e);
    }
}
