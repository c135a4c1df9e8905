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

/// Where a tunnel's datagrams go.
enum WireTx {
    /// Its own UDP socket, to the endpoint (which may roam).
    Udp(Arc<UdpSocket>),
    /// The mesh socket, to a member, on the path routing chose.
    Mesh(Arc<MeshSocket>, ShortId),
}

/// Where a tunnel's datagrams come from.
enum WireRx {
    /// Its own UDP socket; the endpoint's name is resolved again while the tunnel is down.
    Udp(Arc<UdpSocket>, Box<Resolver>),
    /// The datagrams the mesh socket received from the member.
    Mesh(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

impl WireRx {
    /// The next datagram, copied into `buf`: its length and (over UDP) its source. `None`
    /// when the mesh queue closed.
    async fn recv(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, Option<SocketAddr>)>> {
        match self {
            Self::Udp(udp, _) => Some(udp.recv_from(buf).await.map(|(n, from)| (n, Some(from)))),
            Self::Mesh(rx) => {
                let d = rx.recv().await?;
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Some(Ok((n, None)))
            }
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Option<(usize, Option<SocketAddr>)> {
        match self {
            Self::Udp(udp, _) => udp.try_recv_from(buf).ok().map(|(n, from)| (n, Some(from))),
            Self::Mesh(rx) => {
                let d = rx.try_recv().ok()?;
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Some((n, None))
            }
        }
    }
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
    pub async fn start(
        peer: Peer,
        key: &SecretKey,
        resolver: Resolver,
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
            WireTx::Udp(udp.clone()),
            WireRx::Udp(udp, Box::new(resolver)),
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
        loop {
            // Resolve the endpoint at start, and again while the tunnel is down.
            if let WireRx::Udp(_, resolver) = &rx {
                let due = resolved_at.is_none_or(|t| t.elapsed() >= RERESOLVE);
                if due && !self.is_up() {
                    resolved_at = Some(tokio::time::Instant::now());
                    match resolver.resolve(&self.peer.endpoint).await {
                        Ok(r) => {
                            if let Some(a) = r.addrs.first() {
                                let first = lock(&self.shared.endpoint).replace(*a).is_none();
                                if first {
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
                }
                r = rx.recv(&mut inbuf) => match r {
                    None => return,
                    Some(Ok((n, from))) => {
                        self.ingress(&tx, from, n, &mut inbuf, &mut outbuf).await;
                        for _ in 1..BATCH {
                            match rx.try_recv(&mut inbuf) {
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
                _ = self.shared.wake.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// Starts a handshake now rather than at the first flow.
    async fn initiate(&self, tx: &WireTx, out: &mut [u8]) {
        let packet = match self.tunn().format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return,
        };
        self.send(tx, &out[..packet]).await;
    }

    /// boringtun's timers: handshake retries, keepalives, rekeying, expiry.
    async fn tick(&self, tx: &WireTx, out: &mut [u8]) {
        let result = match self.tunn().update_timers(out) {
            TunnResult::WriteToNetwork(p) => Ok(p.len()),
            TunnResult::Err(e) => Err(e),
            _ => return,
        };
        match result {
            Ok(n) => self.send(tx, &out[..n]).await,
            Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                tracing::debug!(peer = %self.peer.name, "wireguard session expired");
            }
            Err(e) => tracing::debug!(peer = %self.peer.name, error = ?e, "wireguard timer"),
        }
    }

    /// One datagram from the network.
    async fn ingress(
        &self,
        tx: &WireTx,
        from: Option<SocketAddr>,
        n: usize,
        inbuf: &mut [u8],
        out: &mut [u8],
    ) {
        enum Next {
            Send(usize),
            Tunnel(usize, IpAddr),
            Done,
            Drop(String),
        }
        let next = match self
            .tunn()
            .decapsulate(from.map(|f| f.ip()), &inbuf[..n], out)
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
        // (roaming).
        let cookie = matches!(next, Next::Send(_)) && out.first() == Some(&3);
        if let Some(from) = from
            && !cookie
        {
            let moved = lock(&self.shared.endpoint).replace(from) != Some(from);
            if moved {
                tracing::info!(peer = %self.peer.name, endpoint = %from, "wireguard peer endpoint");
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
                    self.send(tx, &out[..len]).await;
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
                self.send(tx, &out[..len]).await;
            }
        }
    }

    /// Sends to the peer: its current endpoint, or over the mesh.
    async fn send(&self, tx: &WireTx, datagram: &[u8]) {
        let to = *lock(&self.shared.endpoint);
        self.reply(tx, datagram, to).await;
    }

    /// Sends to `to` (over UDP; the mesh knows its own way).
    async fn reply(&self, tx: &WireTx, datagram: &[u8], to: Option<SocketAddr>) {
        let sent = match (tx, to) {
            (WireTx::Udp(udp), Some(to)) => udp.send_to(datagram, to).await.map(|_| ()),
            (WireTx::Udp(_), None) => return,
            (WireTx::Mesh(socket, member), _) => socket.send_wireguard(member, datagram).await,
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
        }
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
            WireTx::Udp(udp_b.clone()),
            WireRx::Udp(udp_b, Box::new(Resolver::from_system())),
            Some(7100),
            stop.clone(),
        );
        *lock(&b.shared.endpoint) = Some(tap_addr);
        let a = WgTunnel::start(
            peer("b", key_b.public_key(), tap_addr, "10.1.0.1", "10.1.0.2"),
            &key_a,
            Resolver::from_system(),
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
