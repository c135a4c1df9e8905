//! One WireGuard tunnel to one peer, in user space: boringtun's `Tunn` (Noise IK, timers,
//! rekeying) over a UDP socket of its own, and the [`Stack`] carrying TCP flows inside it.
//!
//! One task drives it: datagrams in → decapsulate → IP packets to the stack; the stack's
//! packets → encapsulate → datagrams out; boringtun's timers every 250 ms (handshake
//! retries, keepalives, rekey). Flows ([`WgStream`]) are tokio `AsyncRead`/`AsyncWrite`
//! handles on the stack's sockets; they wake the task when they have written or read.
//!
//! Only packets from the peer's allowed IPs are let in, and flows go only to allowed IPs
//! (cryptokey routing). The peer may roam: an authenticated datagram from a new source
//! moves the endpoint there, as WireGuard does, so a relayed or re-NATed path keeps working.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::Peer;
use super::keys::{SecretKey, format_key};
use super::path::{self, PathAction, PathChoice, Via};
use super::relay::{EndpointRelay, Relayed};
use super::stack::{self, Stack};
use crate::identity::ShortId;
use crate::mesh::MeshSocket;
use crate::resolve::Resolver;

/// How often boringtun's timers run (its own device uses the same tick).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// A session older than this is dead (WireGuard's REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// While down, the initiating side starts a handshake this often (boringtun retries every
/// 5 s itself, but only for 90 s).
const HANDSHAKE_RETRY: Duration = Duration::from_secs(5);
/// While down, the endpoint name is resolved again this often.
const RERESOLVE: Duration = Duration::from_secs(30);
/// Handshakes a listening tunnel takes at once.
const LISTEN_BACKLOG: usize = 16;
/// Datagrams taken from the socket per wake-up before the stack runs.
const BATCH: usize = 64;
/// Largest datagram handled; WireGuard adds 32 bytes to an MTU-sized packet.
const DATAGRAM: usize = 65_536;
/// WireGuard's message type of a handshake initiation (the first byte).
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard's message type of a data packet.
const DATA: u8 = 4;

/// Where a tunnel's datagrams go.
enum WireTx {
    /// Its own UDP socket, to the endpoint (which may roam); and, if the config lists
    /// relays, the other edges that may carry it.
    Udp(Arc<UdpSocket>, Option<Arc<Ways>>),
    /// The mesh socket, to a member, on the path routing chose.
    Mesh(Arc<MeshSocket>, ShortId),
}

/// The ways a tunnel to a stock endpoint may take besides its own UDP socket: other edges
/// that relay it, and which way it takes now.
pub struct Ways {
    relay: Arc<EndpointRelay>,
    /// The relays' names, for logs and status.
    names: Vec<(ShortId, String)>,
    choice: Mutex<PathChoice>,
    clock: tokio::time::Instant,
}

/// Data datagrams a tunnel keeps for sending again after its path moved.
const RECENT_DATAGRAMS: usize = 256;
/// After a move, datagrams sent at most this long ago go again.
const RESEND_WINDOW: Duration = Duration::from_secs(3);

/// Data datagrams sent lately, with when, and when the peer last answered: after the path
/// moved (a relay of the mesh died, or a stock tunnel's way stopped answering), the ones
/// the dead path swallowed go again on the new one at once, so TCP inside does not wait out
/// a retransmission timer that backed off during the outage. The peer's replay window drops
/// any it did get.
struct Resend {
    clock: tokio::time::Instant,
    recent: Mutex<std::collections::VecDeque<(Duration, Vec<u8>)>>,
    /// When an authenticated datagram last came from the peer.
    heard: Mutex<Duration>,
}

impl Resend {
    fn new() -> Self {
        Self {
            clock: tokio::time::Instant::now(),
            recent: Mutex::new(std::collections::VecDeque::new()),
            heard: Mutex::new(Duration::ZERO),
        }
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Keeps a data datagram that expects an answer.
    fn keep(&self, datagram: &[u8]) {
        let now = self.now();
        let mut recent = lock(&self.recent);
        // Once full, the oldest buffer is reused: no allocation per datagram.
        let mut buf = if recent.len() >= RECENT_DATAGRAMS {
            recent.pop_front().map(|(_, b)| b).unwrap_or_default()
        } else {
            Vec::with_capacity(datagram.len())
        };
        buf.clear();
        buf.extend_from_slice(datagram);
        recent.push_back((now, buf));
    }

    fn heard(&self) {
        *lock(&self.heard) = self.now();
    }

    /// The kept datagrams sent since the peer last answered, or since `at_least` if that
    /// is earlier; never older than [`RESEND_WINDOW`].
    fn unanswered(&self, at_least: Option<Duration>) -> Vec<Vec<u8>> {
        let now = self.now();
        let heard = *lock(&self.heard);
        let since = at_least
            .map_or(heard, |t| t.min(heard))
            .max(now.saturating_sub(RESEND_WINDOW));
        lock(&self.recent)
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, d)| d.clone())
            .collect()
    }
}

impl Ways {
    /// Relays from `relays` (member id and name, in the order to try them) through
    /// `relay`; `direct`: whether this edge may send to the endpoint itself. `None` when
    /// there is no way at all.
    pub fn new(
        relay: Arc<EndpointRelay>,
        relays: Vec<(ShortId, String)>,
        direct: bool,
    ) -> Option<Arc<Self>> {
        let clock = tokio::time::Instant::now();
        let ids: Vec<ShortId> = relays.iter().map(|(id, _)| *id).collect();
        let choice = PathChoice::new(direct, &ids, Duration::ZERO)?;
        Some(Arc::new(Self {
            relay,
            names: relays,
            choice: Mutex::new(choice),
            clock,
        }))
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    fn current(&self) -> Via {
        lock(&self.choice).current()
    }

    /// A name for a way, for logs and status.
    fn describe(&self, via: Via) -> String {
        match via {
            Via::Direct => "direct".into(),
            Via::Relay(id) => {
                let name = self
                    .names
                    .iter()
                    .find(|(r, _)| *r == id)
                    .map_or_else(|| id.to_string(), |(_, n)| n.clone());
                format!("via {name}")
            }
        }
    }
}

/// Where a tunnel's datagrams come from.
enum WireRx {
    /// Its own UDP socket; the endpoint's name is resolved again while the tunnel is down.
    /// With relays, also what they bring back (registered once the endpoint is known).
    Udp(
        Arc<UdpSocket>,
        Box<Resolver>,
        Option<tokio::sync::mpsc::Receiver<Relayed>>,
    ),
    /// The datagrams the mesh socket received from the member.
    Mesh(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

/// Where a received datagram came from: its source address (over UDP; for a relayed one,
/// the endpoint it came from) and the way it took.
#[derive(Clone, Copy, Debug)]
struct Source {
    addr: Option<SocketAddr>,
    via: Via,
}

impl WireRx {
    /// The next datagram, copied into `buf`: its length and where it came from. `None`
    /// when the mesh queue closed.
    async fn recv(
        &mut self,
        buf: &mut [u8],
        endpoint: Option<SocketAddr>,
    ) -> Option<io::Result<(usize, Source)>> {
        match self {
            Self::Udp(udp, _, relayed) => loop {
                enum Got {
                    Direct(io::Result<(usize, SocketAddr)>),
                    Relayed(Option<Relayed>),
                }
                let got = match relayed {
                    None => Got::Direct(udp.recv_from(buf).await),
                    Some(rx) => tokio::select! {
                        r = udp.recv_from(buf) => Got::Direct(r),
                        d = rx.recv() => Got::Relayed(d),
                    },
                };
                return Some(match got {
                    Got::Direct(r) => r.map(|(n, from)| {
                        (
                            n,
                            Source {
                                addr: Some(from),
                                via: Via::Direct,
                            },
                        )
                    }),
                    Got::Relayed(Some(d)) => Ok(copy_relayed(d, buf, endpoint)),
                    // The relay stopped: only the direct way is left.
                    Got::Relayed(None) => {
                        *relayed = None;
                        continue;
                    }
                });
            },
            Self::Mesh(rx) => {
                let d = rx.recv().await?;
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Some(Ok((
                    n,
                    Source {
                        addr: None,
                        via: Via::Direct,
                    },
                )))
            }
        }
    }

    fn try_recv(
        &mut self,
        buf: &mut [u8],
        endpoint: Option<SocketAddr>,
    ) -> Option<(usize, Source)> {
        match self {
            Self::Udp(udp, _, relayed) => {
                if let Ok((n, from)) = udp.try_recv_from(buf) {
                    return Some((
                        n,
                        Source {
                            addr: Some(from),
                            via: Via::Direct,
                        },
                    ));
                }
                let d = relayed.as_mut()?.try_recv().ok()?;
                Some(copy_relayed(d, buf, endpoint))
            }
            Self::Mesh(rx) => {
                let d = rx.try_recv().ok()?;
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Some((
                    n,
                    Source {
                        addr: None,
                        via: Via::Direct,
                    },
                ))
            }
        }
    }
}

/// A relayed datagram into `buf`; it comes from the endpoint, by way of its relay.
fn copy_relayed(d: Relayed, buf: &mut [u8], endpoint: Option<SocketAddr>) -> (usize, Source) {
    let n = d.data.len().min(buf.len());
    buf[..n].copy_from_slice(&d.data[..n]);
    (
        n,
        Source {
            addr: endpoint,
            via: Via::Relay(d.via),
        },
    )
}

/// What an operator sees of a tunnel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TunnelStatus {
    /// The peer's name.
    pub peer: String,
    /// The peer's public key.
    pub public_key: String,
    /// This side's public key (what goes in the peer's config).
    pub local_public_key: String,
    /// Where datagrams go now.
    pub endpoint: Option<String>,
    /// This side's tunnel address.
    pub address: String,
    /// Whether a session is up (a handshake in the last three minutes).
    pub up: bool,
    /// Seconds since the last completed handshake.
    pub handshake_age_s: Option<u64>,
    /// Round-trip time of the last handshake, ms.
    pub rtt_ms: Option<u32>,
    /// The way datagrams take, when the tunnel may go through other edges: `direct` or
    /// `via NAME`.
    pub path: Option<String>,
    /// Bytes sent and received inside the tunnel.
    pub tx_bytes: u64,
    /// Bytes received inside the tunnel.
    pub rx_bytes: u64,
    /// Flows open, and flows still closing.
    pub flows: usize,
    /// Flows whose close is not over yet.
    pub closing: usize,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Datagrams dropped unanswered: garbage, replays, strangers' handshakes, packets
    /// from outside the allowed IPs.
    pub dropped: u64,
}

/// State the driver task and the flows share.
struct Shared {
    stack: Mutex<Stack>,
    /// Wakes the driver: a flow wrote, read (window update), opened or closed.
    wake: Notify,
    /// Where the peer is now, once known.
    endpoint: Mutex<Option<SocketAddr>>,
    last_error: Mutex<Option<String>>,
    /// Told when a flow was accepted on the listening port.
    accepted: Notify,
    /// Datagrams dropped unanswered.
    dropped: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn stack(&self) -> MutexGuard<'_, Stack> {
        // A flow that panicked while holding the lock leaves the stack usable: its data
        // structures are smoltcp's, consistent between calls.
        self.stack.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running tunnel.
pub struct WgTunnel {
    peer: Peer,
    local_public: [u8; 32],
    shared: Arc<Shared>,
    tunn: Arc<Mutex<Tunn>>,
    clock: tokio::time::Instant,
    /// Whether it runs over the mesh socket (no endpoint of its own).
    over_mesh: bool,
    /// The ways through other edges, for a stock endpoint that lists relays.
    ways: Option<Arc<Ways>>,
    /// Datagrams to send again when the path moves: for tunnels over the mesh, and
    /// stock tunnels with more than one way.
    resend: Option<Resend>,
}

impl std::fmt::Debug for WgTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgTunnel")
            .field("peer", &self.peer.name)
            .finish()
    }
}

/// Why a flow could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not in the peer's allowed IPs.
    #[error("{0} is not in the allowed IPs of peer {1}")]
    NotAllowed(SocketAddr, String),
    /// The stack refused (full, no port).
    #[error(transparent)]
    Stack(#[from] stack::OpenError),
    /// The far side refused, or the handshake did not complete, in time.
    #[error("connecting to {0} through the tunnel failed: {1}")]
    Failed(SocketAddr, String),
}

impl WgTunnel {
    /// Binds the tunnel's UDP socket and starts its task; the first handshake starts at
    /// once (and is retried by boringtun's timers until the peer answers).
    ///
    /// `ways`: other edges that may carry the tunnel (see [`Ways`]), if the peer lists any.
    pub async fn start(
        peer: Peer,
        key: &SecretKey,
        resolver: Resolver,
        ways: Option<Arc<Ways>>,
        stop: CancellationToken,
    ) -> io::Result<Arc<Self>> {
        let bind: SocketAddr = match resolver.resolve(&peer.endpoint).await {
            Ok(r) if r.addrs.first().is_some_and(SocketAddr::is_ipv6) => (
                std::net::Ipv6Addr::UNSPECIFIED,
                peer.listen_port.unwrap_or(0),
            )
                .into(),
            _ => (
                std::net::Ipv4Addr::UNSPECIFIED,
                peer.listen_port.unwrap_or(0),
            )
                .into(),
        };
        let udp = Arc::new(UdpSocket::bind(bind).await?);
        tracing::info!(
            peer = %peer.name,
            endpoint = %peer.endpoint,
            local = %udp.local_addr()?,
            public_key = %format_key(&key.public_key()),
            "wireguard tunnel starting"
        );
        Ok(Self::launch(
            peer,
            key,
            WireTx::Udp(udp.clone(), ways),
            WireRx::Udp(udp, Box::new(resolver), None),
            None,
            stop,
        ))
    }

    /// Starts a tunnel to the member `member` over the mesh socket: its datagrams take the
    /// paths routing chooses, direct or relayed, and `inbound` brings the ones the socket
    /// received from it. `listen`: accept flows on this port (the connector's side);
    /// without it, this side starts the handshake (the edge's).
    pub fn start_mesh(
        peer: Peer,
        key: &SecretKey,
        socket: Arc<MeshSocket>,
        member: ShortId,
        inbound: tokio::sync::mpsc::Receiver<Vec<u8>>,
        listen: Option<u16>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Self::launch(
            peer,
            key,
            WireTx::Mesh(socket, member),
            WireRx::Mesh(inbound),
            listen,
            stop,
        )
    }

    fn launch(
        peer: Peer,
        key: &SecretKey,
        tx: WireTx,
        rx: WireRx,
        listen: Option<u16>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let clock = tokio::time::Instant::now();
        let mut stack = Stack::new(
            peer.address,
            peer.mtu,
            peer.flow_buffer_bytes,
            peer.max_flows,
            stack::smol_now(clock),
        );
        if let Some(port) = listen {
            stack.listen(port, LISTEN_BACKLOG);
        }
        let tunn = Tunn::new(
            key.static_secret(),
            boringtun::x25519::PublicKey::from(peer.public_key),
            peer.preshared_key.as_ref().map(|k| k.0),
            peer.keepalive
                .map(|d| u16::try_from(d.as_secs()).unwrap_or(u16::MAX)),
            rand::random::<u32>() >> 8,
            None,
        );
        let over_mesh = matches!(tx, WireTx::Mesh(..));
        let ways = match &tx {
            WireTx::Udp(_, ways) => ways.clone(),
            WireTx::Mesh(..) => None,
        };
        let resend = (over_mesh
            || ways
                .as_ref()
                .is_some_and(|w| lock(&w.choice).has_alternatives()))
        .then(Resend::new);
        let tunnel = Arc::new(Self {
            local_public: key.public_key(),
            shared: Arc::new(Shared {
                stack: Mutex::new(stack),
                wake: Notify::new(),
                endpoint: Mutex::new(None),
                last_error: Mutex::new(None),
                accepted: Notify::new(),
                dropped: std::sync::atomic::AtomicU64::new(0),
            }),
            tunn: Arc::new(Mutex::new(tunn)),
            peer,
            clock,
            over_mesh,
            ways,
            resend,
        });
        let initiate = listen.is_none();
        tokio::spawn(tunnel.clone().run(tx, rx, initiate, stop));
        tunnel
    }

    /// The next flow the peer opened to the listening port (see [`WgTunnel::start_mesh`]).
    pub async fn accept(&self) -> WgStream {
        loop {
            let accepted = {
                let mut stack = self.shared.stack();
                stack.pop_accepted().map(|handle| {
                    let remote = stack.socket(handle).remote_endpoint();
                    (handle, remote)
                })
            };
            if let Some((handle, remote)) = accepted {
                let peer = remote.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |e| {
                    SocketAddr::new(e.addr.into(), e.port)
                });
                return WgStream {
                    flow: FlowHandle::new(self.shared.clone(), handle, peer),
                };
            }
            self.shared.accepted.notified().await;
        }
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.peer.name
    }

    /// Whether a session is up.
    pub fn is_up(&self) -> bool {
        self.tunn()
            .time_since_last_handshake()
            .is_some_and(|t| t < SESSION_LIFETIME)
    }

    /// Round-trip time of the last handshake, when a session is up.
    pub fn rtt(&self) -> Option<Duration> {
        let (age, _, _, _, rtt) = self.tunn().stats();
        age.filter(|a| *a < SESSION_LIFETIME)?;
        rtt.map(|ms| Duration::from_millis(u64::from(ms)))
    }

    /// Opens a TCP flow to `addr` inside the tunnel, within `timeout`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<WgStream, ConnectError> {
        if !self.peer.allows(addr.ip()) {
            return Err(ConnectError::NotAllowed(addr, self.peer.name.clone()));
        }
        let handle = self.shared.stack().connect(addr)?;
        let stream = WgStream {
            flow: FlowHandle::new(self.shared.clone(), handle, addr),
        };
        self.shared.wake.notify_one();
        let established = std::future::poll_fn(|cx| stream.flow.poll_established(cx));
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(ConnectError::Failed(addr, e.to_string())),
            Err(_) => Err(ConnectError::Failed(
                addr,
                if self.is_up() {
                    "no answer in time".into()
                } else {
                    "no WireGuard handshake with the peer".into()
                },
            )),
        }
    }

    /// What an operator sees.
    pub fn status(&self) -> TunnelStatus {
        let (age, tx, rx, _loss, rtt) = self.tunn().stats();
        let (flows, closing) = self.shared.stack().flows();
        TunnelStatus {
            peer: self.peer.name.clone(),
            public_key: format_key(&self.peer.public_key),
            local_public_key: format_key(&self.local_public),
            endpoint: if self.over_mesh {
                Some("mesh".into())
            } else {
                lock(&self.shared.endpoint).map(|a| a.to_string())
            },
            address: self.peer.address.to_string(),
            up: age.is_some_and(|a| a < SESSION_LIFETIME),
            handshake_age_s: age.map(|a| a.as_secs()),
            rtt_ms: rtt,
            path: self.ways.as_ref().map(|w| w.describe(w.current())),
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            flows,
            closing,
            last_error: lock(&self.shared.last_error).clone(),
            dropped: self
                .shared
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn tunn(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_error(&self, e: String) {
        *lock(&self.shared.last_error) = Some(e);
    }

    /// The driver task.
    async fn run(
        self: Arc<Self>,
        tx: WireTx,
        mut rx: WireRx,
        initiate: bool,
        stop: CancellationToken,
    ) {
        let name = self.peer.name.clone();
        let mut inbuf = vec![0u8; DATAGRAM];
        let mut outbuf = vec![0u8; DATAGRAM + 32];
        let mut timers = tokio::time::interval(TIMER_TICK);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resolved_at: Option<tokio::time::Instant> = None;
        let mut kicked = tokio::time::Instant::now();
        if initiate && matches!(tx, WireTx::Mesh(..)) {
            self.initiate(&tx, &mut outbuf).await;
        }
        // Over the mesh: route changes, and the route to the member as last seen.
        let (mut route_changes, mut route) = match &tx {
            WireTx::Mesh(socket, member) => (Some(socket.route_changes()), socket.route(member)),
            WireTx::Udp(..) => (None, None),
        };
        loop {
            // Resolve the endpoint at start, and again while the tunnel is down.
            if let WireRx::Udp(_, resolver, relayed) = &mut rx {
                let due = resolved_at.is_none_or(|t| t.elapsed() >= RERESOLVE);
                if due && !self.is_up() {
                    resolved_at = Some(tokio::time::Instant::now());
                    match resolver.resolve(&self.peer.endpoint).await {
                        Ok(r) => {
                            if let Some(a) = r.addrs.first() {
                                let old = lock(&self.shared.endpoint).replace(*a);
                                if old != Some(*a)
                                    && let Some(ways) = &self.ways
                                {
                                    // What relays bring back from there comes to this
                                    // tunnel, and this edge may relay there for others.
                                    *relayed = Some(ways.relay.register(*a));
                                    ways.relay.allow(*a);
                                }
                                if old.is_none() {
                                    self.initiate(&tx, &mut outbuf).await;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(peer = %name, error = %e, "cannot resolve the WireGuard endpoint");
                            self.note_error(e.to_string());
                        }
                    }
                }
            }
            self.egress(&tx, &mut outbuf).await;
            let delay = {
                let now = stack::smol_now(self.clock);
                let mut stack = self.shared.stack();
                if stack.has_accepted() {
                    self.shared.accepted.notify_one();
                }
                stack.poll_delay(now).map(Duration::from)
            };
            let sleep = tokio::time::sleep(delay.unwrap_or(TIMER_TICK).min(TIMER_TICK));
            let endpoint = *lock(&self.shared.endpoint);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                // Before the datagrams: a long download must not starve rekeying and
                // keepalives.
                _ = timers.tick() => {
                    self.tick(&tx, &mut outbuf).await;
                    // boringtun stops retrying a handshake after 90 s, and only a packet
                    // to send starts it again: the side that initiates asks again every
                    // few seconds while down, so a tunnel comes back however long the
                    // peer was gone.
                    if initiate && !self.is_up() && kicked.elapsed() >= HANDSHAKE_RETRY {
                        kicked = tokio::time::Instant::now();
                        self.initiate(&tx, &mut outbuf).await;
                    }
                    self.judge_path(&tx, &mut outbuf).await;
                }
                r = rx.recv(&mut inbuf, endpoint) => match r {
                    None => return,
                    Some(Ok((n, from))) => {
                        self.ingress(&tx, from, n, &mut inbuf, &mut outbuf).await;
                        for _ in 1..BATCH {
                            match rx.try_recv(&mut inbuf, endpoint) {
                                Some((n, from)) => self.ingress(&tx, from, n, &mut inbuf, &mut outbuf).await,
                                None => break,
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // ICMP errors surface here on some systems; the socket stays usable.
                        tracing::debug!(peer = %name, error = %e, "wireguard socket receive error");
                    }
                },
                Some(()) = async {
                    match &mut route_changes {
                        Some(changes) => changes.changed().await.ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if let WireTx::Mesh(socket, member) = &tx {
                        let now = socket.route(member);
                        if now != route {
                            route = now;
                            self.path_moved(&tx).await;
                        }
                    }
                }
                _ = self.shared.wake.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// The mesh moved the route to the member: what the old path may have swallowed since
    /// the member last answered goes again on the new one, as QUIC connections are nudged.
    async fn path_moved(&self, tx: &WireTx) {
        let Some(resend) = &self.resend else {
            return;
        };
        let lost = resend.unanswered(None);
        tracing::debug!(peer = %self.peer.name, datagrams = lost.len(), "route moved; sending again what may be lost");
        for datagram in &lost {
            self.reply(
                tx,
                datagram,
                Source {
                    addr: None,
                    via: Via::Direct,
                },
            )
            .await;
        }
    }

    /// Whether the way the tunnel takes still answers; moves it to the next way if not, and
    /// tries the direct way again while a relay carries it.
    async fn judge_path(&self, tx: &WireTx, out: &mut [u8]) {
        let (WireTx::Udp(udp, Some(ways)), Some(endpoint)) = (tx, *lock(&self.shared.endpoint))
        else {
            return;
        };
        let action = {
            let rtt = self.rtt();
            lock(&ways.choice).poll(ways.now(), rtt)
        };
        match action {
            PathAction::Stay => {}
            PathAction::Switched { from, to } => {
                tracing::warn!(
                    peer = %self.peer.name,
                    from = %ways.describe(from),
                    to = %ways.describe(to),
                    "wireguard path stopped answering; moved"
                );
                metrics::counter!("skylane_wireguard_path_switches_total", "reason" => "no_answer")
                    .increment(1);
                // What went out on the dead way since it last answered goes again.
                let lost = self.resend.as_ref().map_or_else(Vec::new, |r| {
                    r.unanswered(Some(
                        r.now()
                            .saturating_sub(path::answer_timeout(self.rtt()) + TIMER_TICK * 2),
                    ))
                });
                for datagram in &lost {
                    self.reply(
                        tx,
                        datagram,
                        Source {
                            addr: Some(endpoint),
                            via: to,
                        },
                    )
                    .await;
                }
            }
            PathAction::ProbeDirect => {
                // A handshake straight to the endpoint: if it answers straight back, the
                // tunnel moves home (see `PathChoice::heard`).
                let n = match self.tunn().format_handshake_initiation(out, false) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => return,
                };
                if let Err(e) = udp.send_to(&out[..n], endpoint).await {
                    tracing::debug!(peer = %self.peer.name, error = %e, "direct probe not sent");
                }
            }
        }
    }

    /// Starts a handshake now rather than at the first flow.
    async fn initiate(&self, tx: &WireTx, out: &mut [u8]) {
        let packet = match self.tunn().format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return,
        };
        self.send(tx, &out[..packet], true).await;
    }

    /// boringtun's timers: handshake retries, keepalives, rekeying, expiry.
    async fn tick(&self, tx: &WireTx, out: &mut [u8]) {
        let result = match self.tunn().update_timers(out) {
            TunnResult::WriteToNetwork(p) => Ok(p.len()),
            TunnResult::Err(e) => Err(e),
            _ => return,
        };
        match result {
            // A handshake initiation gets an answer; a keepalive does not.
            Ok(n) => self.send(tx, &out[..n], out[0] == HANDSHAKE_INIT).await,
            Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                tracing::debug!(peer = %self.peer.name, "wireguard session expired");
            }
            Err(e) => tracing::debug!(peer = %self.peer.name, error = ?e, "wireguard timer"),
        }
    }

    /// One datagram from the network.
    async fn ingress(&self, tx: &WireTx, from: Source, n: usize, inbuf: &mut [u8], out: &mut [u8]) {
        enum Next {
            Send(usize),
            Tunnel(usize, IpAddr),
            Done,
            Drop(String),
        }
        let next = match self
            .tunn()
            .decapsulate(from.addr.map(|f| f.ip()), &inbuf[..n], out)
        {
            TunnResult::WriteToNetwork(p) => Next::Send(p.len()),
            TunnResult::WriteToTunnelV4(p, src) => Next::Tunnel(p.len(), src.into()),
            TunnResult::WriteToTunnelV6(p, src) => Next::Tunnel(p.len(), src.into()),
            TunnResult::Done => Next::Done,
            TunnResult::Err(e) => Next::Drop(format!("{e:?}")),
        };
        if let Next::Drop(e) = next {
            self.shared
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("skylane_wireguard_dropped_total", "reason" => "bad_datagram")
                .increment(1);
            tracing::debug!(peer = %self.peer.name, ?from, error = %e, "wireguard datagram dropped");
            return;
        }
        // A cookie reply (message type 3) answers a datagram boringtun could not yet
        // authenticate, under load: it goes back to the sender, who does not become the
        // endpoint. Anything else passed authentication: the peer is where it came from
        // (roaming), and the way it came by answers.
        let cookie = matches!(next, Next::Send(_)) && out.first() == Some(&3);
        if !cookie {
            if let Some(resend) = &self.resend {
                resend.heard();
            }
            if let Some(addr) = from.addr {
                let moved = lock(&self.shared.endpoint).replace(addr) != Some(addr);
                if moved {
                    tracing::info!(peer = %self.peer.name, endpoint = %addr, "wireguard peer endpoint");
                }
            }
            if let WireTx::Udp(_, Some(ways)) = tx {
                let switched = lock(&ways.choice).heard(ways.now(), from.via);
                if let Some((old, new)) = switched {
                    tracing::info!(
                        peer = %self.peer.name,
                        from = %ways.describe(old),
                        to = %ways.describe(new),
                        "wireguard path answers again; moved back"
                    );
                    metrics::counter!("skylane_wireguard_path_switches_total", "reason" => "direct_back")
                        .increment(1);
                }
            }
        }
        match next {
            Next::Send(len) => {
                self.reply(tx, &out[..len], from).await;
                if cookie {
                    return;
                }
                // Packets queued during the handshake go now.
                loop {
                    let len = match self.tunn().decapsulate(None, &[], out) {
                        TunnResult::WriteToNetwork(p) => p.len(),
                        _ => break,
                    };
                    self.send(tx, &out[..len], true).await;
                }
            }
            Next::Tunnel(len, src) => {
                if !self.peer.allows(src) {
                    self.shared
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!("skylane_wireguard_dropped_total", "reason" => "source_not_allowed")
                        .increment(1);
                    tracing::debug!(peer = %self.peer.name, %src, "packet from outside the allowed IPs dropped");
                    return;
                }
                if !self.shared.stack().push_inbound(&out[..len]) {
                    metrics::counter!("skylane_wireguard_dropped_total", "reason" => "queue_full")
                        .increment(1);
                }
            }
            Next::Done | Next::Drop(_) => {}
        }
    }

    /// Runs the stack and sends what it emitted.
    async fn egress(&self, tx: &WireTx, out: &mut [u8]) {
        let now = stack::smol_now(self.clock);
        loop {
            let packets: Vec<Vec<u8>> = {
                let mut s = self.shared.stack();
                s.poll(now);
                std::iter::from_fn(|| s.pop_outbound())
                    .take(BATCH)
                    .collect()
            };
            if packets.is_empty() {
                return;
            }
            for p in packets {
                let len = match self.tunn().encapsulate(&p, out) {
                    TunnResult::WriteToNetwork(d) => d.len(),
                    // Queued until the handshake completes (a handshake initiation, if
                    // one was due, is what came back instead).
                    TunnResult::Done => continue,
                    TunnResult::Err(e) => {
                        tracing::debug!(peer = %self.peer.name, error = ?e, "packet not encapsulated");
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => continue,
                };
                let expects = out[0] == HANDSHAKE_INIT || path::expects_answer(&p);
                self.send(tx, &out[..len], expects).await;
            }
        }
    }

    /// Sends to the peer: its current endpoint, the way the tunnel takes now (or over the
    /// mesh). `expects_answer`: the peer answers it within a round trip.
    async fn send(&self, tx: &WireTx, datagram: &[u8], expects_answer: bool) {
        let to = *lock(&self.shared.endpoint);
        let via = match tx {
            WireTx::Udp(_, Some(ways)) => {
                let mut choice = lock(&ways.choice);
                choice.sent(ways.now(), expects_answer);
                choice.current()
            }
            _ => Via::Direct,
        };
        if let Some(resend) = &self.resend
            && expects_answer
            && datagram.first() == Some(&DATA)
        {
            resend.keep(datagram);
        }
        self.reply(tx, datagram, Source { addr: to, via }).await;
    }

    /// Sends to `to`: over UDP directly, through the relay it names, or over the mesh
    /// (which knows its own way).
    async fn reply(&self, tx: &WireTx, datagram: &[u8], to: Source) {
        let sent = match (tx, to.addr, to.via) {
            (WireTx::Udp(_, Some(ways)), Some(addr), Via::Relay(relay)) => {
                ways.relay.send_via(&relay, addr, datagram).await
            }
            (WireTx::Udp(udp, _), Some(addr), _) => udp.send_to(datagram, addr).await.map(|_| ()),
            (WireTx::Udp(..), None, _) => return,
            (WireTx::Mesh(socket, member), _, _) => socket.send_wireguard(member, datagram).await,
        };
        if let Err(e) = sent {
            tracing::debug!(peer = %self.peer.name, ?to, error = %e, "wireguard send failed");
            self.note_error(format!("send: {e}"));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One TCP flow's socket in a tunnel's stack, shared by the stream or its two halves;
/// released (closed, then freed) when the last of them is dropped.
struct FlowHandle {
    shared: Arc<Shared>,
    handle: SocketHandle,
    peer: SocketAddr,
    /// The peer's FIN was seen: a closed socket afterwards is an end, not a reset.
    fin: std::sync::atomic::AtomicBool,
}

impl Drop for FlowHandle {
    fn drop(&mut self) {
        self.shared.stack().release(self.handle);
        self.shared.wake.notify_one();
    }
}

fn fin_received(state: tcp::State) -> bool {
    matches!(
        state,
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    )
}

impl FlowHandle {
    fn new(shared: Arc<Shared>, handle: SocketHandle, peer: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            shared,
            handle,
            peer,
            fin: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn poll_established(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut stack = self.shared.stack();
        let s = stack.socket(self.handle);
        match s.state() {
            tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
            tcp::State::Closed | tcp::State::TimeWait => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))),
            _ => {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut stack = self.shared.stack();
        let s = stack.socket(self.handle);
        if fin_received(s.state()) {
            self.fin.store(true, Relaxed);
        }
        if s.can_recv() {
            let n = s
                .recv_slice(buf.initialize_unfilled())
                .map_err(io::Error::other)?;
            buf.advance(n);
            drop(stack);
            // The window opened: the driver may owe the peer an update.
            self.shared.wake.notify_one();
            return Poll::Ready(Ok(()));
        }
        if !s.may_recv() {
            // Closed without the peer's FIN: a reset (or a timeout), which must not pass
            // for the end of the stream — a truncated body would look complete.
            return if s.state() == tcp::State::Closed && !self.fin.load(Relaxed) {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            } else {
                Poll::Ready(Ok(()))
            };
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut stack = self.shared.stack();
        let s = stack.socket(self.handle);
        if !s.may_send() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.can_send() {
            let n = s.send_slice(data).map_err(io::Error::other)?;
            drop(stack);
            self.shared.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    /// Sends a FIN after the buffered data; reading goes on (half-close).
    fn shutdown(&self) {
        let mut stack = self.shared.stack();
        let s = stack.socket(self.handle);
        if fin_received(s.state()) {
            self.fin.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        s.close();
        drop(stack);
        self.shared.wake.notify_one();
    }

    /// Ends the flow with a reset: the peer sees an error, not an end.
    fn abort(&self) {
        self.shared.stack().abort(self.handle);
        self.shared.wake.notify_one();
    }
}

/// One TCP flow inside a tunnel. Dropping it closes the flow (see [`Stack::release`]).
pub struct WgStream {
    flow: Arc<FlowHandle>,
}

/// The reading half of a [`WgStream`].
pub struct WgReadHalf {
    flow: Arc<FlowHandle>,
}

/// The writing half of a [`WgStream`]; it can also reset the flow.
pub struct WgWriteHalf {
    flow: Arc<FlowHandle>,
}

impl std::fmt::Debug for WgStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgStream")
            .field("peer", &self.flow.peer)
            .finish()
    }
}

impl WgStream {
    /// Where the flow goes (or, accepted, where it came from).
    pub fn peer_addr(&self) -> SocketAddr {
        self.flow.peer
    }

    /// Splits the flow into halves that can be used from different tasks; the flow is
    /// released when both are dropped.
    pub fn into_split(self) -> (WgReadHalf, WgWriteHalf) {
        (
            WgReadHalf {
                flow: self.flow.clone(),
            },
            WgWriteHalf { flow: self.flow },
        )
    }

    /// Ends the flow with a reset.
    pub fn abort(&self) {
        self.flow.abort();
    }
}

impl WgWriteHalf {
    /// Ends the flow with a reset: the peer sees an error, not an end.
    pub fn abort(&self) {
        self.flow.abort();
    }
}

impl AsyncRead for WgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.flow.poll_read(cx, buf)
    }
}

impl AsyncRead for WgReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.flow.poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a type holding a `flow: Arc<FlowHandle>` (the stream and its writing
/// half behave alike).
macro_rules! write_through_flow {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                data: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.flow.poll_write(cx, data)
            }

            /// Written data is in the stack's send buffer, which sends it on its own:
            /// nothing to flush (waiting for the peer's ACK here would stall every small
            /// write a round trip).
            fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }

            fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.flow.shutdown();
                Poll::Ready(Ok(()))
            }
        }
    };
}

write_through_flow!(WgStream);
write_through_flow!(WgWriteHalf);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn peer(name: &str, public_key: [u8; 32], endpoint: SocketAddr, me: &str, them: &str) -> Peer {
        Peer {
            name: name.into(),
            public_key,
            endpoint: endpoint.to_string(),
            address: me.parse().expect("ip"),
            allowed_ips: vec![ipnet::IpNet::from(them.parse::<IpAddr>().expect("ip"))],
            preshared_key: None,
            keepalive: None,
            listen_port: None,
            flow_buffer_bytes: 64 * 1024,
            max_flows: 16,
            mtu: 1420,
            relays: Vec::new(),
            direct: true,
        }
    }

    /// Drives a mesh socket's receive path (as quinn's endpoint driver would).
    fn drive(socket: Arc<MeshSocket>, stop: CancellationToken) {
        use quinn::AsyncUdpSocket as _;
        use quinn::udp::RecvMeta;
        tokio::spawn(async move {
            let mut storage = vec![vec![0u8; 65_536]; 8];
            let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(b))
                .collect();
            let mut meta = vec![RecvMeta::default(); 8];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)) => {
                        if r.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// A stock endpoint `b` reached by `a` directly through a NAT-like tap that can cut a's
    /// own way, and through the edge `r` that relays for it: a flow keeps working when a's
    /// own way is cut, the tunnel says it goes via `r`, and `r` carried its datagrams.
    #[tokio::test]
    async fn a_stock_tunnel_moves_to_a_relay_when_its_own_way_stops_answering() {
        let stop = CancellationToken::new();
        let key_a = SecretKey::from_bytes(rand::random());
        let key_b = SecretKey::from_bytes(rand::random());
        // The endpoint b, listening.
        let udp_b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let b_addr = udp_b.local_addr().expect("addr");
        let b = WgTunnel::launch(
            peer("a", key_a.public_key(), b_addr, "10.1.0.2", "10.1.0.1"),
            &key_b,
            WireTx::Udp(udp_b.clone(), None),
            WireRx::Udp(udp_b, Box::new(Resolver::from_system()), None),
            Some(7100),
            stop.clone(),
        );
        // The mesh: edges a and r.
        let node_keys: Vec<crate::identity::NodeKey> = (0..2)
            .map(|_| crate::identity::NodeKey::generate().expect("key"))
            .collect();
        let members = crate::membership::test_members(&node_keys);
        let mut sockets = Vec::new();
        for k in &node_keys {
            let s = MeshSocket::bind("127.0.0.1:0".parse().expect("addr"), k, members.clone())
                .await
                .expect("bind");
            drive(s.clone(), stop.clone());
            sockets.push(s);
        }
        for (i, s) in sockets.iter().enumerate() {
            let other = 1 - i;
            s.set_peer_addr(
                &node_keys[other].id(),
                sockets[other].udp_addr().expect("addr"),
            );
        }
        let relay_a = EndpointRelay::start(sockets[0].clone(), stop.clone()).expect("relay a");
        let relay_r = EndpointRelay::start(sockets[1].clone(), stop.clone()).expect("relay r");
        // r names the same endpoint in its own config.
        relay_r.allow(b_addr);
        // a's own way: a tap that gives each client its own way to b (so b sees a and r
        // at different addresses, as from two machines), and can cut the first client's
        // (a's) both ways.
        let tap = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let tap_addr = tap.local_addr().expect("addr");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (tap, cut) = (tap.clone(), cut.clone());
            tokio::spawn(async move {
                let mut ways: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> =
                    Default::default();
                let mut first: Option<SocketAddr> = None;
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, client)) = tap.recv_from(&mut buf).await {
                    let first = *first.get_or_insert(client);
                    let is_cut = |c: SocketAddr| {
                        c == first && cut.load(std::sync::atomic::Ordering::Relaxed)
                    };
                    if is_cut(client) {
                        continue;
                    }
                    let up = match ways.get(&client) {
                        Some(up) => up.clone(),
                        None => {
                            let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                            ways.insert(client, up.clone());
                            let (up2, tap2, cut2) = (up.clone(), tap.clone(), cut.clone());
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 65_536];
                                while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                                    let dead = client == first
                                        && cut2.load(std::sync::atomic::Ordering::Relaxed);
                                    if !dead {
                                        let _ = tap2.send_to(&buf[..n], client).await;
                                    }
                                }
                            });
                            up
                        }
                    };
                    let _ = up.send_to(&buf[..n], b_addr).await;
                }
            });
        }
        // a's tunnel: its endpoint is the tap (its own way), r may carry it. r sends to
        // the same endpoint, which it was allowed.
        relay_r.allow(tap_addr);
        let r_id = node_keys[1].id().short();
        let ways = Ways::new(relay_a.clone(), vec![(r_id, "r".into())], true).expect("ways");
        let a = WgTunnel::start(
            peer("b", key_b.public_key(), tap_addr, "10.1.0.1", "10.1.0.2"),
            &key_a,
            Resolver::from_system(),
            Some(ways),
            stop.clone(),
        )
        .await
        .expect("start");
        let target: SocketAddr = "10.1.0.2:7100".parse().expect("addr");
        let (mut flow, mut accepted) = open_flow(&a, &b, target).await;
        let echo = |n: u8| vec![n; 1000];
        for n in 0..3u8 {
            flow.write_all(&echo(n)).await.expect("write");
            let mut got = vec![0u8; 1000];
            tokio::time::timeout(Duration::from_secs(5), accepted.read_exact(&mut got))
                .await
                .expect("in time")
                .expect("read");
            assert_eq!(got, echo(n));
        }
        assert_eq!(a.status().path.as_deref(), Some("direct"));
        // Cut a's own way: the flow goes on through r.
        cut.store(true, std::sync::atomic::Ordering::Relaxed);
        let cut_at = tokio::time::Instant::now();
        for n in 3..10u8 {
            flow.write_all(&echo(n)).await.expect("write");
            let mut got = vec![0u8; 1000];
            tokio::time::timeout(Duration::from_secs(10), accepted.read_exact(&mut got))
                .await
                .expect("the flow goes on through the relay")
                .expect("read");
            assert_eq!(got, echo(n));
            // And the other way.
            accepted.write_all(&got).await.expect("write back");
            let mut back = vec![0u8; 1000];
            tokio::time::timeout(Duration::from_secs(10), flow.read_exact(&mut back))
                .await
                .expect("the answer comes back through the relay")
                .expect("read");
            assert_eq!(back, echo(n));
        }
        let took = cut_at.elapsed();
        eprintln!("7 round trips across the cut in {took:?}");
        assert_eq!(a.status().path.as_deref(), Some("via r"));
        let carried = relay_r.counters();
        assert!(
            carried.carried_out > 0 && carried.carried_in > 0,
            "{carried:?}"
        );
        assert!(relay_a.counters().received > 0);
        assert_eq!(relay_r.carried(), 1);
        // About 1 s to judge the way dead, then the lost datagrams go again at once.
        assert!(took < Duration::from_secs(3), "took {took:?}");
        stop.cancel();
    }

    /// A flow from `a` to `target`, and its other end as `b` accepts it.
    async fn open_flow(a: &WgTunnel, b: &WgTunnel, target: SocketAddr) -> (WgStream, WgStream) {
        let (flow, accepted) = tokio::join!(
            async {
                a.connect(target, Duration::from_secs(5))
                    .await
                    .expect("connect")
            },
            tokio::time::timeout(Duration::from_secs(5), b.accept()),
        );
        (flow, accepted.expect("accepted in time"))
    }

    /// Two tunnels on loopback with a tap between them that can replay what it saw and
    /// inject anything: a flow works, and garbage, a replayed data packet and a stranger's
    /// handshake are dropped, counted and never answered.
    #[tokio::test]
    async fn garbage_replays_and_strangers_are_dropped_counted_and_unanswered() {
        let stop = CancellationToken::new();
        let key_a = SecretKey::from_bytes(rand::random());
        let key_b = SecretKey::from_bytes(rand::random());
        let udp_b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let tap = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let b_addr = udp_b.local_addr().expect("addr");
        let tap_addr = tap.local_addr().expect("addr");
        // b listens; a reaches it through the tap.
        let b = WgTunnel::launch(
            peer("a", key_a.public_key(), tap_addr, "10.1.0.2", "10.1.0.1"),
            &key_b,
            WireTx::Udp(udp_b.clone(), None),
            WireRx::Udp(udp_b, Box::new(Resolver::from_system()), None),
            Some(7100),
            stop.clone(),
        );
        *lock(&b.shared.endpoint) = Some(tap_addr);
        let a = WgTunnel::start(
            peer("b", key_b.public_key(), tap_addr, "10.1.0.1", "10.1.0.2"),
            &key_a,
            Resolver::from_system(),
            None,
            stop.clone(),
        )
        .await
        .expect("start");
        // The tap: a → b recorded; b → a passed back, and counted.
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let from_b = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a_addr: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (tap, seen, from_b, a_addr) =
                (tap.clone(), seen.clone(), from_b.clone(), a_addr.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, from)) = tap.recv_from(&mut buf).await else {
                        return;
                    };
                    if from == b_addr {
                        from_b.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let to = *lock(&a_addr);
                        if let Some(to) = to {
                            let _ = tap.send_to(&buf[..n], to).await;
                        }
                    } else {
                        *lock(&a_addr) = Some(from);
                        lock(&seen).push(buf[..n].to_vec());
                        let _ = tap.send_to(&buf[..n], b_addr).await;
                    }
                }
            });
        }
        let target: SocketAddr = "10.1.0.2:7100".parse().expect("addr");
        let (mut flow, mut accepted) = open_flow(&a, &b, target).await;
        flow.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), accepted.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&got, b"hello");
        assert_eq!(b.status().dropped, 0);
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Now inject, and watch b say nothing.
        let answered_before = from_b.load(std::sync::atomic::Ordering::Relaxed);
        let data_packet = lock(&seen)
            .iter()
            .rev()
            .find(|d| d.first() == Some(&4))
            .cloned()
            .expect("a data packet went by");
        let stranger = Tunn::new(
            boringtun::x25519::StaticSecret::from(rand::random::<[u8; 32]>()),
            boringtun::x25519::PublicKey::from(key_b.public_key()),
            None,
            None,
            7,
            None,
        );
        let mut init = vec![0u8; 256];
        let init = match { stranger }.format_handshake_initiation(&mut init, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        let injector = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let garbage: Vec<u8> = (0..200).map(|i| (i * 37) as u8).collect();
        for datagram in [&data_packet, &data_packet, &garbage, &init, &vec![1u8; 148]] {
            // From the tap's address (a replay on a's path) and from a stranger's.
            tap.send_to(datagram, b_addr).await.expect("send");
            injector.send_to(datagram, b_addr).await.expect("send");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dropped = b.status().dropped;
        assert!(
            dropped >= 10,
            "only {dropped} of 10 injected datagrams counted as dropped"
        );
        assert_eq!(
            from_b.load(std::sync::atomic::Ordering::Relaxed),
            answered_before,
            "b answered an injected datagram"
        );
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), injector.recv_from(&mut buf))
                .await
                .is_err(),
            "b answered the stranger"
        );
        // The session survived it all.
        flow.write_all(b" again").await.expect("write");
        let mut got = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), accepted.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&got, b" again");

        // A FIN reaches the other side as the end of the stream, a reset as an error.
        let (mut second, mut accepted2) = open_flow(&a, &b, target).await;
        second.write_all(b"bye").await.expect("write");
        second.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), accepted2.read_to_end(&mut rest))
            .await
            .expect("in time")
            .expect("a FIN is an end");
        assert_eq!(rest, b"bye");
        flow.abort();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), accepted.read(&mut buf))
            .await
            .expect("in time");
        assert!(read.is_err(), "a reset must not read as the end: {read:?}");
        stop.cancel();
    }
}
