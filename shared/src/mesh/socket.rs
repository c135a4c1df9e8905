//! The mesh socket: one UDP socket per node, seen by quinn as a socket whose peers are
//! node identities ([`super::addr`]).
//!
//! This is the I/O adapter around the sans-IO [`MeshCore`], which judges and frames every
//! datagram. quinn sends through [`AsyncUdpSocket::try_send`] and receives through
//! [`AsyncUdpSocket::poll_recv`]; the WireGuard driver sends with
//! [`MeshSocket::send_wireguard`] and takes what arrives with
//! [`MeshSocket::take_wireguard`]; the control loop (routing, membership, bulletin) sends with
//! [`MeshSocket::send_control`] and takes what arrives with [`MeshSocket::take_control`].
//! Relayed frames for other nodes are forwarded from inside the receive path, unopened.
//!
//! Because the path to a member lives below QUIC and WireGuard ([`MeshSocket::set_route`]),
//! it can change without either noticing: connections, streams and the websockets riding
//! on them survive a path change.
//!
//! The UDP socket is driven through quinn-udp ([`UdpSocketState`]), as quinn drives its own
//! sockets: several packets leave in one segmentation-offload (GSO) send, each in its own
//! frame; datagrams arrive many per `recvmmsg`, several per buffer when the kernel coalesces
//! them (GRO), and each is judged on its own ([`super::batch`]). The don't-fragment bit is
//! set, so quinn can discover the path MTU.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::addr::{short_id_of, virtual_addr};
use super::auth::AuthError;
use super::batch::{ForwardBatch, Packer, PendingPacket, copy_between, deliver_pending};
use super::core::{DropReason, FrameSendError, Inbound, MeshCore, Outbound, SocketCounters};
use super::frame::BodyType;
use super::peers::PeerView;
use super::poller::Writable;
use crate::identity::{NodeId, NodeKey, ShortId};
use crate::membership::Members;
use crate::routing::Timestamp;

/// Socket buffer size asked of the kernel, each way.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Control datagrams waiting for the control loop; beyond this they are dropped (routing
/// and membership tolerate loss).
const CONTROL_QUEUE: usize = 4096;
/// WireGuard datagrams waiting for the WireGuard driver; beyond this they are dropped, as
/// on a congested link (the TCP flows inside send them again).
const WIREGUARD_QUEUE: usize = 4096;

/// A WireGuard datagram that reached this node, for its WireGuard driver.
#[derive(Clone, Debug)]
pub struct WireguardDatagram {
    /// The member it claims to come from (the first node of its path); the WireGuard
    /// session of that member authenticates it.
    pub from: ShortId,
    /// The datagram.
    pub data: Vec<u8>,
}

/// A datagram of a tunnel to a stock WireGuard endpoint that travels through another edge
/// (see [`crate::wireguard::relay`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointDatagram {
    /// A member asks this node to send it to the endpoint.
    Out {
        /// The member whose tunnel it is.
        from: ShortId,
        /// The stock endpoint.
        endpoint: SocketAddr,
        /// The WireGuard datagram.
        data: Vec<u8>,
    },
    /// A relay brings what the endpoint sent it for this node.
    In {
        /// The relay.
        via: ShortId,
        /// The stock endpoint.
        endpoint: SocketAddr,
        /// The WireGuard datagram.
        data: Vec<u8>,
    },
}

/// A routing or membership datagram from a member, authenticated, for the control loop.
#[derive(Clone, Debug)]
pub struct ControlDatagram {
    /// The member that sent it (one hop away).
    pub from: ShortId,
    /// Routing or membership.
    pub body_type: BodyType,
    /// The datagram.
    pub body: Vec<u8>,
}

/// The mesh socket. Create it with [`MeshSocket::bind`], then give it to quinn with
/// [`crate::quic::endpoint`].
pub struct MeshSocket {
    io: tokio::net::UdpSocket,
    /// quinn-udp's driver for `io`: segmentation offload both ways, batched receive, ECN
    /// and the don't-fragment bit.
    state: UdpSocketState,
    /// What receiving keeps between calls. Only quinn's endpoint driver receives, so the
    /// lock is uncontended; it is taken once per batch, not per datagram.
    recv: Mutex<RecvState>,
    core: MeshCore,
    /// The core's clock starts here.
    epoch: Instant,
    control_tx: mpsc::Sender<ControlDatagram>,
    control_rx: Mutex<Option<mpsc::Receiver<ControlDatagram>>>,
    wireguard_tx: mpsc::Sender<WireguardDatagram>,
    wireguard_rx: Mutex<Option<mpsc::Receiver<WireguardDatagram>>>,
    endpoint_tx: mpsc::Sender<EndpointDatagram>,
    endpoint_rx: Mutex<Option<mpsc::Receiver<EndpointDatagram>>>,
    /// Bumped at every route change, so transports that keep state of their own (the
    /// WireGuard driver) can react as QUIC's nudges do.
    routes_changed: tokio::sync::watch::Sender<u64>,
    /// The process this one took the socket over from, while it drains: its QUIC packets
    /// go to it through a pipe (see [`super::handoff`]).
    predecessor: arc_swap::ArcSwapOption<super::handoff::Predecessor>,
    /// Set once a successor owns the socket ([`MeshSocket::set_handed_over`]): this
    /// process no longer reads it.
    handed_over: std::sync::atomic::AtomicBool,
}

impl std::os::fd::AsFd for MeshSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.io.as_fd()
    }
}

impl fmt::Debug for MeshSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSocket")
            .field("local", &self.core.local_id())
            .field("udp", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// What receiving keeps between calls of `poll_recv`.
#[derive(Default)]
struct RecvState {
    /// QUIC packets already demultiplexed that did not fit the buffers quinn lent (a
    /// coalesced buffer held more runs than there were free buffers); delivered first, in
    /// order, by the next call. At most one received batch, as nothing is read meanwhile.
    pending: VecDeque<PendingPacket>,
    /// Relayed frames for their next hop, collected while a batch is demultiplexed.
    forward: ForwardBatch,
}

impl MeshSocket {
    /// Binds the node's UDP socket.
    pub async fn bind(
        addr: SocketAddr,
        key: &NodeKey,
        members: Members,
    ) -> Result<Arc<Self>, BindError> {
        let io = tokio::net::UdpSocket::bind(addr).await?;
        Self::from_tokio(io, key, members)
    }

    /// Wraps an already-bound socket (tests bind `127.0.0.1:0` themselves). Sets the
    /// options quinn-udp wants on it: GRO, don't-fragment, ECN and packet info.
    pub fn from_tokio(
        io: tokio::net::UdpSocket,
        key: &NodeKey,
        members: Members,
    ) -> Result<Arc<Self>, BindError> {
        // The frame counter starts at the clock in µs, so it grows across restarts and
        // receivers' replay windows accept the restarted node at once.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        let core = MeshCore::new(key, members, start)?;
        for name in core.unusable_members() {
            tracing::warn!(member = %name, "member's public key is not usable for link keys; it can't relay or be relayed to");
        }
        let state = UdpSocketState::new((&io).into())?;
        // The kernel's default buffers (about 200 KiB here) overflow during bursts: one
        // dropped datagram costs the tunnel a congestion-window cut for every flow on it.
        // The kernel caps the request at net.core.[rw]mem_max; a smaller grant is fine.
        let enlarged = state
            .set_recv_buffer_size((&io).into(), SOCKET_BUFFER_BYTES)
            .and_then(|()| state.set_send_buffer_size((&io).into(), SOCKET_BUFFER_BYTES));
        if let Err(e) = enlarged {
            tracing::debug!(error = %e, "could not enlarge the mesh socket's buffers");
        }
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (wireguard_tx, wireguard_rx) = mpsc::channel(WIREGUARD_QUEUE);
        let (endpoint_tx, endpoint_rx) = mpsc::channel(WIREGUARD_QUEUE);
        Ok(Arc::new(Self {
            io,
            state,
            recv: Mutex::new(RecvState::default()),
            core,
            epoch: Instant::now(),
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
            wireguard_tx,
            wireguard_rx: Mutex::new(Some(wireguard_rx)),
            endpoint_tx,
            endpoint_rx: Mutex::new(Some(endpoint_rx)),
            routes_changed: tokio::sync::watch::Sender::new(0),
            predecessor: arc_swap::ArcSwapOption::empty(),
            handed_over: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The UDP address the socket is bound to.
    pub fn udp_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// This node's identity.
    pub fn local_id(&self) -> NodeId {
        self.core.local_id()
    }

    /// The member list the socket enforces.
    pub fn members(&self) -> Members {
        self.core.members()
    }

    /// Replaces the member list the socket enforces (a reload); see
    /// [`MeshCore::set_members`].
    pub fn set_members(&self, members: Members) -> Result<(), AuthError> {
        self.core.set_members(members)
    }

    /// What the socket has counted so far.
    pub fn counters(&self) -> &SocketCounters {
        self.core.counters()
    }

    /// The socket's clock, as the core reads it.
    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.epoch.elapsed())
    }

    /// Sets where a peer's datagrams go (from config or a DNS answer).
    pub fn set_peer_addr(&self, peer: &NodeId, addr: SocketAddr) {
        self.core.peers().set_addr(peer.short(), addr);
    }

    /// Where a peer's datagrams go on the direct path, if anywhere.
    pub fn peer_addr(&self, peer: &NodeId) -> Option<SocketAddr> {
        self.core.peers().addr(&peer.short())
    }

    /// What the socket knows of a peer, and how long ago it last heard from it.
    pub fn peer_view(&self, peer: &NodeId) -> Option<(PeerView, Option<std::time::Duration>)> {
        let view = self.core.peers().view(&peer.short())?;
        let now = self.now();
        Some((view, view.heard.map(|t| now.saturating_since(t))))
    }

    /// Sets the path datagrams to `destination` take: `path` lists every node from this one
    /// to the destination; two nodes (or `None`) mean direct. Takes effect with the next
    /// datagram.
    pub fn set_route(&self, destination: ShortId, path: Option<&[ShortId]>) {
        self.core.peers().set_route(destination, path);
        self.routes_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Passes the QUIC packets of the process this one took the socket over from (their
    /// connection IDs start with `generation`) to it through `pipe`, and sends what it
    /// sends down the pipe as this node's, until the pipe closes.
    pub fn set_predecessor(
        self: &Arc<Self>,
        pipe: std::os::unix::net::UnixDatagram,
        generation: u8,
    ) -> io::Result<()> {
        pipe.set_nonblocking(true)?;
        let pipe = Arc::new(tokio::net::UnixDatagram::from_std(pipe)?);
        self.predecessor
            .store(Some(Arc::new(super::handoff::Predecessor {
                pipe: pipe.clone(),
                generation,
                cid_len: crate::quic::CID_LEN,
            })));
        let this = self.clone();
        tokio::spawn(async move { this.carry_predecessor(pipe).await });
        Ok(())
    }

    /// Stops (`true`) or resumes (`false`) reading the socket in this process, for the old
    /// process of a hand-over.
    ///
    /// Both processes hold the same UDP socket, and the kernel gives each datagram to
    /// whichever reads first. Once the successor reads it, every datagram must be its:
    /// it passes the old process's QUIC packets back through the pipe. A packet of the
    /// successor's read here would meet a quinn endpoint that does not know its connection
    /// ID, and that endpoint would answer with a stateless reset the peer accepts (both
    /// processes derive reset tokens from the node's key), killing the successor's tunnel.
    ///
    /// Receiving fails while handed over, so quinn drops the socket it polls beside the
    /// pipe after [`quinn::Endpoint::rebind_abstract`]; sending goes on (the successor
    /// sends the old process's packets anyway, but control datagrams still leave from here).
    /// Set it only after rebinding the endpoint away from this socket, and clear it before
    /// rebinding back: an endpoint whose own socket fails to receive stops.
    pub fn set_handed_over(&self, handed_over: bool) {
        self.handed_over.store(handed_over, Ordering::Release);
    }

    /// Whether a successor owns the socket now ([`MeshSocket::set_handed_over`]).
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Sends what the old process sends down the pipe, until it closes.
    async fn carry_predecessor(&self, pipe: Arc<tokio::net::UnixDatagram>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match pipe.recv(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            let Some((to, ecn, packet)) = super::handoff::decode(&buf[..n]) else {
                continue;
            };
            let Some(dst) = short_id_of(&to) else {
                continue;
            };
            loop {
                let sent = SEND_BUF.with(|out| {
                    let mut out = out.borrow_mut();
                    out.clear();
                    let framed = self.core.frame_quic(&dst, packet, packet.len(), &mut out);
                    let Some(frame) = self.lost_unless_framed(framed, 1)? else {
                        return Ok(());
                    };
                    self.send_segments(frame.to, ecn, &out, frame.frame_len)
                });
                match sent {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.io.writable().await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        self.predecessor.store(None);
        tracing::info!("the process this one took over from is gone");
    }

    /// Passes a QUIC packet of the old process's to it; lost (as on the wire) if the pipe
    /// is full, and the old process forgotten if the pipe is gone.
    fn pass_back(
        &self,
        pred: &super::handoff::Predecessor,
        from: SocketAddr,
        ecn: Option<EcnCodepoint>,
        packet: &[u8],
    ) {
        let result = SEND_BUF.with(|out| {
            let mut out = out.borrow_mut();
            super::handoff::encode_header(&mut out, from, ecn);
            out.extend_from_slice(packet);
            pred.pipe.try_send(&out)
        });
        match result {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.predecessor.store(None),
        }
    }

    /// The relays datagrams to `destination` go through now (every node of the path, this
    /// one first), or `None` when they go direct.
    pub fn route(&self, destination: &ShortId) -> Option<Vec<ShortId>> {
        self.core
            .peers()
            .route(destination)
            .map(|r| r.nodes().to_vec())
    }

    /// A receiver that sees a change whenever any route changes.
    pub fn route_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }

    /// Takes the stream of authenticated routing and membership datagrams (once; later
    /// calls get `None`).
    pub fn take_control(&self) -> Option<mpsc::Receiver<ControlDatagram>> {
        self.control_rx.lock().ok().and_then(|mut rx| rx.take())
    }

    /// Takes the stream of WireGuard datagrams that reached this node (once; later calls get
    /// `None`). Until it is taken, they are dropped.
    pub fn take_wireguard(&self) -> Option<mpsc::Receiver<WireguardDatagram>> {
        self.wireguard_rx.lock().ok().and_then(|mut rx| rx.take())
    }

    /// Takes the stream of datagrams of tunnels to stock WireGuard endpoints that other
    /// edges carry through this one, or that this one's tunnels get through other edges
    /// (once; later calls get `None`). Until it is taken, they are dropped.
    pub fn take_endpoint_datagrams(&self) -> Option<mpsc::Receiver<EndpointDatagram>> {
        self.endpoint_rx.lock().ok().and_then(|mut rx| rx.take())
    }

    /// Sends a datagram of a tunnel to the stock `endpoint` to the member `to`, on the
    /// direct path: [`BodyType::ToEndpoint`] asks it to send the datagram on to the
    /// endpoint, [`BodyType::FromEndpoint`] brings it what the endpoint sent. Lost, counted,
    /// if `to` has no address. Waits while the socket's send buffer is full.
    pub async fn send_endpoint(
        &self,
        to: &ShortId,
        body_type: BodyType,
        endpoint: SocketAddr,
        datagram: &[u8],
    ) -> io::Result<()> {
        loop {
            let sent = SEND_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.clear();
                let framed = self
                    .core
                    .frame_endpoint(to, body_type, endpoint, datagram, &mut buf);
                let Some(out) = self.lost_unless_framed(framed, 1)? else {
                    return Ok(());
                };
                self.io.try_send_to(&buf, out.to).map(|_| ())
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                other => return other,
            }
        }
    }

    /// Sends a WireGuard datagram to a member on the path routing chose for it (as QUIC
    /// datagrams to it go): direct, or through relays. A datagram with no path is lost, as
    /// on the wire; WireGuard and the TCP flows inside recover. Waits while the socket's
    /// send buffer is full.
    pub async fn send_wireguard(&self, to: &ShortId, datagram: &[u8]) -> io::Result<()> {
        loop {
            match self.try_send_wireguard(to, datagram) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                other => return other,
            }
        }
    }

    fn try_send_wireguard(&self, to: &ShortId, datagram: &[u8]) -> io::Result<()> {
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let framed = self.core.frame_wireguard(to, datagram, &mut buf);
            let Some(out) = self.lost_unless_framed(framed, 1)? else {
                return Ok(());
            };
            self.send_segments(out.to, None, &buf, out.frame_len)?;
            let counters = self.counters();
            counters.wireguard_sent.fetch_add(1, Ordering::Relaxed);
            if out.relayed {
                counters.relayed_sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    /// Sends a routing or membership datagram to a peer on the direct path.
    pub fn send_control(&self, to: &ShortId, body_type: BodyType, body: &[u8]) -> io::Result<()> {
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let out = self
                .core
                .frame_control(to, body_type, body, &mut buf)
                .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))?;
            self.io.try_send_to(&buf, out.to)?;
            self.counters().control_sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    /// What became of framing `frames` data packets: framed, or lost like packets on the
    /// wire (no path yet: the protocol above retransmits and routing looks for another
    /// path), counted.
    fn lost_unless_framed(
        &self,
        framed: Result<Outbound, FrameSendError>,
        frames: u64,
    ) -> io::Result<Option<Outbound>> {
        match framed {
            Ok(out) => Ok(Some(out)),
            Err(FrameSendError::Empty) => Ok(None),
            Err(FrameSendError::NoPath | FrameSendError::NoLinkKey) => {
                self.counters().no_path.fetch_add(frames, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Sends `frames`, datagrams of `frame_len` bytes back to back (the last may be
    /// shorter), to `addr` in one send: segmentation offload when there are several.
    fn send_segments(
        &self,
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        frames: &[u8],
        frame_len: usize,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: addr,
            ecn,
            contents: frames,
            // quinn-udp asks the kernel to segment only if there is more than one segment.
            segment_size: Some(frame_len),
            // The transmit's source is a virtual address; the kernel picks the real one.
            src_ip: None,
        };
        // quinn-udp reports only `WouldBlock` (so quinn waits for writability); other send
        // errors are logged and the datagrams count as lost, as on quinn's own sockets.
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), &transmit)
        })
    }

    /// Sends the relayed frames collected while demultiplexing, if any.
    fn flush_forward(&self, batch: &mut ForwardBatch) {
        let Some(send) = batch.ready() else {
            return;
        };
        let frames = send.count as u64;
        match self.send_segments(send.to, send.ecn, send.frames, send.frame_len) {
            Ok(()) => {
                self.counters()
                    .relayed_forwarded
                    .fetch_add(frames, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters().no_path.fetch_add(frames, Ordering::Relaxed);
                tracing::trace!(error = %e, frames, "could not forward relayed datagrams");
            }
        }
        batch.clear();
    }

    /// Queues what the core judged to be for the control loop, the WireGuard driver or the
    /// stock-endpoint relay; a full queue drops it, counted.
    fn hand_over(&self, inbound: Inbound<'_>, from: SocketAddr) {
        let counters = self.counters();
        let dropped = match inbound {
            Inbound::Control {
                from: member,
                body_type,
                body,
            } => queue(
                &self.control_tx,
                ControlDatagram {
                    from: member,
                    body_type,
                    body: body.to_vec(),
                },
                &counters.control_received,
                DropReason::ControlQueueFull,
            ),
            Inbound::Wireguard {
                from: member,
                datagram,
            } => queue(
                &self.wireguard_tx,
                WireguardDatagram {
                    from: member,
                    data: datagram.to_vec(),
                },
                &counters.wireguard_received,
                DropReason::WireguardQueueFull,
            ),
            Inbound::ToEndpoint {
                from: member,
                endpoint,
                datagram,
            } => queue(
                &self.endpoint_tx,
                EndpointDatagram::Out {
                    from: member,
                    endpoint,
                    data: datagram.to_vec(),
                },
                &counters.wireguard_received,
                DropReason::WireguardQueueFull,
            ),
            Inbound::FromEndpoint {
                via,
                endpoint,
                datagram,
            } => queue(
                &self.endpoint_tx,
                EndpointDatagram::In {
                    via,
                    endpoint,
                    data: datagram.to_vec(),
                },
                &counters.wireguard_received,
                DropReason::WireguardQueueFull,
            ),
            _ => None,
        };
        if let Some(reason) = dropped {
            self.core.count_drop(reason, from);
        }
    }

    /// Demultiplexes `count` received buffers (each may hold several datagrams, `stride`
    /// bytes apart) and packs the QUIC packets among them to the front of the buffers, in
    /// order, as runs quinn can read. Packets that need more buffers than are free at that
    /// point go to `state.pending`, and so does everything after them, to keep the order.
    /// Returns how many buffers hold runs.
    fn demux(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        count: usize,
        state: &mut RecvState,
    ) -> usize {
        let now = self.now();
        let capacity = bufs[..count].iter().map(|b| b.len()).min().unwrap_or(0);
        let max_segments = self.state.max_gso_segments();
        let mut packer = Packer::default();
        let mut spilling = false;
        for i in 0..count {
            // Copied: the packer may rewrite this meta once buffer `i` is read.
            let received = meta[i];
            let len = received.len.min(bufs[i].len());
            if len == 0 {
                self.core
                    .count_drop(DropReason::Malformed("empty"), received.addr);
                continue;
            }
            // Without GRO the stride is the datagram's length; never let it be 0.
            let stride = match received.stride {
                0 => len,
                s => s.min(len),
            };
            let mut start = 0;
            while start < len {
                let end = (start + stride).min(len);
                let datagram = start..end;
                start = end;
                let inbound = self
                    .core
                    .classify(now, &bufs[i][datagram.clone()], received.addr);
                let (packet, src) = match inbound {
                    Inbound::Quic { packet, from } => {
                        let whole = datagram.start + packet.start..datagram.start + packet.end;
                        if let Some(pred) = self.predecessor.load().as_deref()
                            && pred.owns(&bufs[i][whole.clone()])
                        {
                            self.pass_back(pred, from, received.ecn, &bufs[i][whole]);
                            continue;
                        }
                        (packet, from)
                    }
                    Inbound::Forward(forward) => {
                        // The ECN mark travels on, so congestion the first hop saw reaches
                        // the receiver.
                        let batch = &mut state.forward;
                        let len = forward.frame_len();
                        if !batch.takes(forward.to, received.ecn, len, max_segments) {
                            self.flush_forward(batch);
                        }
                        if self.core.seal_forward(&forward, &mut batch.buf).is_ok() {
                            batch.added(forward.to, received.ecn, len);
                        }
                        continue;
                    }
                    Inbound::Drop(_) => continue,
                    other => {
                        self.hand_over(other, received.addr);
                        continue;
                    }
                };
                let payload = datagram.start + packet.start..datagram.start + packet.end;
                // Buffers up to `i` are free: everything in them was read. Packing never
                // overtakes reading, as each packet is shorter than its datagram.
                let place = if spilling {
                    None
                } else {
                    packer.place(meta, src, received.ecn, payload.len(), capacity, i)
                };
                match place {
                    Some((slot, at)) => copy_between(bufs, i, payload, slot, at),
                    None => {
                        spilling = true;
                        state.pending.push_back(PendingPacket {
                            addr: src,
                            ecn: received.ecn,
                            data: bufs[i][payload].to_vec(),
                        });
                    }
                }
            }
        }
        packer.finish(meta)
    }
}

/// Queues `item` and counts it in `received`, or says why it was dropped (`full`).
fn queue<T>(
    tx: &mpsc::Sender<T>,
    item: T,
    received: &std::sync::atomic::AtomicU64,
    full: DropReason,
) -> Option<DropReason> {
    match tx.try_send(item) {
        Ok(()) => {
            received.fetch_add(1, Ordering::Relaxed);
            None
        }
        Err(_) => Some(full),
    }
}

/// Why the mesh socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be bound.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The node key can't give link keys.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

thread_local! {
    /// Scratch buffer for framing outgoing packets, so sending does not allocate.
    static SEND_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(65_536));
}

impl AsyncUdpSocket for MeshSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Writable::boxed(move || {
            let socket = self.clone();
            Box::pin(async move { socket.io.writable().await })
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(dst) = short_id_of(&transmit.destination) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a mesh virtual address",
            ));
        };
        let contents = transmit.contents;
        // With segmentation offload, quinn hands over several QUIC packets of
        // `segment_size` bytes (the last may be shorter); each gets its own mesh frame.
        let segment = transmit
            .segment_size
            .filter(|&s| s > 0)
            .unwrap_or(contents.len());
        let packets = contents.len().div_ceil(segment.max(1)) as u64;
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let framed = self.core.frame_quic(&dst, contents, segment, &mut buf);
            let Some(out) = self.lost_unless_framed(framed, packets)? else {
                return Ok(());
            };
            self.send_segments(out.to, transmit.ecn, &buf, out.frame_len)?;
            let counters = self.counters();
            counters.quic_sent.fetch_add(packets, Ordering::Relaxed);
            if out.relayed {
                counters.relayed_sent.fetch_add(packets, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.handed_over.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::other(
                "the mesh socket was handed to a successor",
            )));
        }
        let slots = bufs.len().min(meta.len());
        if slots == 0 {
            return Poll::Ready(Ok(0));
        }
        // The state holds plain buffers; a panic elsewhere leaves nothing inconsistent.
        let mut state = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        if !state.pending.is_empty() {
            return Poll::Ready(Ok(deliver_pending(&mut state.pending, bufs, meta, slots)));
        }
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let received = self.io.try_io(Interest::READABLE, || {
                self.state
                    .recv((&self.io).into(), &mut bufs[..slots], &mut meta[..slots])
            });
            let count = match received {
                Ok(count) => count.min(slots),
                // `try_io` cleared the readiness; wait for the next datagram.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // An ICMP error reported for an earlier send says nothing about this
                // receive; a dead path is the prober's business, not quinn's.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            let mut filled = self.demux(bufs, meta, count, state);
            self.flush_forward(&mut state.forward);
            if filled == 0 && !state.pending.is_empty() {
                // Not expected (spilling starts only once a buffer is filled), but reading
                // on would put newer packets before these.
                filled = deliver_pending(&mut state.pending, bufs, meta, slots);
            }
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
            // All control, forwarded or dropped: read on. tokio's cooperative budget in
            // `poll_recv_ready` bounds how long a flood keeps this task here.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(virtual_addr(&self.core.local_id()))
    }

    fn may_fragment(&self) -> bool {
        // quinn-udp sets don't-fragment where the platform lets it; only then may quinn
        // probe for a larger MTU, as a fragmented probe would prove nothing.
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::auth::{LinkKeys, TAG_LEN};
    use crate::mesh::frame;
    use std::sync::atomic::AtomicU64;

    use std::time::Duration;

    /// quinn's receive buffers: `BATCH_SIZE` of them, each its largest UDP payload times
    /// the GRO segments the socket reports (as `quinn::Endpoint` sizes them).
    const QUINN_PAYLOAD: usize = 1472;

    /// What one QUIC packet came up as.
    #[derive(Debug, PartialEq, Eq)]
    struct Got {
        from: SocketAddr,
        ecn: Option<EcnCodepoint>,
        data: Vec<u8>,
    }

    /// How packets `sent` by the node at `from` should come up at their destination: in
    /// order, with the ECN mark quinn asked for (passed on by any relay).
    fn sent_from(from: SocketAddr, sent: Vec<Vec<u8>>) -> Vec<Got> {
        sent.into_iter()
            .map(|data| Got {
                from,
                ecn: Some(EcnCodepoint::Ect0),
                data,
            })
            .collect()
    }

    struct Mesh {
        keys: Vec<NodeKey>,
        members: Members,
        sockets: Vec<Arc<MeshSocket>>,
    }

    impl Mesh {
        /// `n` member sockets on loopback, each knowing the others' addresses.
        async fn new(n: usize) -> Self {
            let keys: Vec<NodeKey> = (0..n).map(|_| NodeKey::generate().expect("key")).collect();
            let members = crate::membership::test_members(&keys);
            let mut sockets = Vec::new();
            for key in &keys {
                let addr = "127.0.0.1:0".parse().expect("addr");
                sockets.push(
                    MeshSocket::bind(addr, key, members.clone())
                        .await
                        .expect("bind"),
                );
            }
            for (i, s) in sockets.iter().enumerate() {
                for (j, key) in keys.iter().enumerate() {
                    if i != j {
                        s.set_peer_addr(&key.id(), sockets[j].udp_addr().expect("addr"));
                    }
                }
            }
            Self {
                keys,
                members,
                sockets,
            }
        }

        fn short(&self, i: usize) -> ShortId {
            self.keys[i].id().short()
        }

        fn vaddr(&self, i: usize) -> SocketAddr {
            virtual_addr(&self.keys[i].id())
        }
    }

    /// A QUIC-packet stand-in: `len` bytes that name their transmit and index.
    fn packet(transmit: usize, index: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 31 + index * 7 + transmit * 13) as u8)
            .collect()
    }

    /// Receives until `want` QUIC packets came up, checking every `RecvMeta` is one quinn
    /// can split: a run of one stride whose last packet alone may be shorter. Returns the
    /// packets and how many `poll_recv` calls delivered them.
    async fn receive(socket: &MeshSocket, want: usize) -> (Vec<Got>, usize) {
        let size = QUINN_PAYLOAD * socket.max_receive_segments();
        let mut storage = vec![vec![0u8; size]; quinn::udp::BATCH_SIZE];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        let mut got = Vec::new();
        let mut calls = 0;
        while got.len() < want {
            let n = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} packets arrived", got.len()))
            .expect("poll_recv");
            calls += 1;
            for (m, buf) in meta.iter().zip(&bufs).take(n) {
                assert!(m.stride > 0 && m.len > 0 && m.len <= buf.len(), "{m:?}");
                assert_eq!(m.dst_ip, None);
                let chunks: Vec<&[u8]> = buf[..m.len].chunks(m.stride).collect();
                for (i, chunk) in chunks.iter().enumerate() {
                    assert!(
                        chunk.len() == m.stride || i + 1 == chunks.len(),
                        "only the last packet of a run may be short: {m:?}"
                    );
                    got.push(Got {
                        from: m.addr,
                        ecn: m.ecn,
                        data: chunk.to_vec(),
                    });
                }
            }
        }
        (got, calls)
    }

    /// Sends transmits of `segments` packets each, as quinn does with segmentation offload
    /// (the last packet of each shorter), and returns the packets in the order sent.
    async fn send_transmits(
        socket: &MeshSocket,
        to: SocketAddr,
        transmits: usize,
        segments: usize,
        segment: usize,
    ) -> Vec<Vec<u8>> {
        let mut sent = Vec::new();
        for t in 0..transmits {
            let mut contents = Vec::new();
            for i in 0..segments {
                let len = if i + 1 == segments {
                    segment / 2
                } else {
                    segment
                };
                let p = packet(t, i, len);
                contents.extend_from_slice(&p);
                sent.push(p);
            }
            let transmit = Transmit {
                destination: to,
                ecn: Some(EcnCodepoint::Ect0),
                contents: &contents,
                segment_size: (segments > 1).then_some(segment),
                src_ip: None,
            };
            // As quinn does: wait for writability, send, and wait again on `WouldBlock`.
            loop {
                socket.io.writable().await.expect("writable");
                match socket.try_send(&transmit) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break result.expect("send"),
                }
            }
            // Let the receivers drain their sockets: loopback queues the datagrams at once,
            // and a socket receive buffer holds only a few dozen coalesced transmits.
            tokio::task::yield_now().await;
        }
        sent
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Segments per transmit: as many as the socket offers, capped like quinn caps them.
    fn segments(socket: &MeshSocket) -> usize {
        socket.max_transmit_segments().clamp(1, 10)
    }

    #[tokio::test]
    async fn a_forged_quic_frame_does_not_teach_a_members_address() {
        let keys: Vec<NodeKey> = (0..2).map(|_| NodeKey::generate().expect("key")).collect();
        let members = crate::membership::test_members(&keys);
        let local = "127.0.0.1:0".parse().expect("addr");
        let a = MeshSocket::bind(local, &keys[0], members.clone())
            .await
            .expect("bind");
        let b = MeshSocket::bind(local, &keys[1], members)
            .await
            .expect("bind");
        let a_addr = a.udp_addr().expect("addr");
        // A stranger sends a QUIC frame claiming to come from member b, whose address `a`
        // does not know yet (b is behind NAT).
        let stranger = tokio::net::UdpSocket::bind(local).await.expect("bind");
        let mut forged = Vec::new();
        frame::encode_quic_header(&mut forged, keys[1].id().short());
        forged.extend_from_slice(&packet(0, 0, 100));
        stranger.send_to(&forged, a_addr).await.expect("send");
        let (got, _) = receive(&a, 1).await;
        assert_eq!(got.len(), 1, "the packet itself still goes up to QUIC");
        assert_eq!(a.peer_addr(&keys[1].id()), None);
        // b's own authenticated frame does teach it.
        b.set_peer_addr(&keys[0].id(), a_addr);
        b.send_control(&keys[0].id().short(), BodyType::Swim, b"hello")
            .expect("send");
        let mut control = a.take_control().expect("control");
        let pending = tokio::spawn({
            let a = a.clone();
            async move {
                let _ = receive(&a, 1).await;
            }
        });
        let datagram = tokio::time::timeout(Duration::from_secs(5), control.recv())
            .await
            .expect("in time")
            .expect("datagram");
        pending.abort();
        assert_eq!(datagram.body, b"hello");
        assert_eq!(
            a.peer_addr(&keys[1].id()),
            Some(b.udp_addr().expect("addr"))
        );
    }

    #[tokio::test]
    async fn multi_segment_transmits_arrive_intact_and_in_order() {
        let mesh = Mesh::new(2).await;
        let (a, b) = (&mesh.sockets[0], &mesh.sockets[1]);
        let segs = segments(a);
        // Small transmits, so the receive buffer of the socket never overflows.
        let want = 20 * segs;
        let (sent, (got, _)) = tokio::join!(
            send_transmits(a, mesh.vaddr(1), 20, segs, 1200),
            receive(b, want)
        );
        assert_eq!(count(&a.counters().quic_sent), sent.len() as u64);
        let expected = sent_from(mesh.vaddr(0), sent);
        assert_eq!(got, expected);
        assert_eq!(count(&b.counters().quic_received), expected.len() as u64);
    }

    #[tokio::test]
    async fn multi_segment_transmits_ride_a_relay() {
        let mesh = Mesh::new(3).await;
        let (a, r, b) = (&mesh.sockets[0], &mesh.sockets[1], &mesh.sockets[2]);
        a.set_route(
            mesh.short(2),
            Some(&[mesh.short(0), mesh.short(1), mesh.short(2)]),
        );
        // The relay forwards from inside its receive path; nothing comes up to quinn.
        let relay = r.clone();
        let relaying = tokio::spawn(async move {
            let size = QUINN_PAYLOAD * relay.max_receive_segments();
            let mut storage = vec![vec![0u8; size]; quinn::udp::BATCH_SIZE];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
            loop {
                let n = std::future::poll_fn(|cx| relay.poll_recv(cx, &mut bufs, &mut meta))
                    .await
                    .expect("poll_recv");
                assert_eq!(n, 0, "the relay passed packets up: {:?}", &meta[..n]);
            }
        });
        let segs = segments(a);
        let want = 20 * segs;
        let (sent, (got, _)) = tokio::join!(
            send_transmits(a, mesh.vaddr(2), 20, segs, 1100),
            receive(b, want)
        );
        relaying.abort();
        match relaying.await {
            Err(e) if e.is_cancelled() => {}
            other => panic!("the relay's receive loop ended: {other:?}"),
        }
        let expected = sent_from(mesh.vaddr(0), sent);
        assert_eq!(got, expected);
        let n = expected.len() as u64;
        assert_eq!(count(&a.counters().relayed_sent), n);
        assert_eq!(count(&r.counters().relayed_forwarded), n);
        assert_eq!(count(&b.counters().relayed_received), n);
        for c in [&r.counters().bad_tag, &r.counters().replayed] {
            assert_eq!(count(c), 0);
        }
        for c in [&b.counters().bad_tag, &b.counters().replayed] {
            assert_eq!(count(c), 0);
        }
    }

    /// Drives `socket`'s receive path (as quinn's endpoint driver does) until cancelled,
    /// failing if a packet comes up to quinn.
    fn drive_receive(socket: Arc<MeshSocket>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let size = QUINN_PAYLOAD * socket.max_receive_segments();
            let mut storage = vec![vec![0u8; size]; quinn::udp::BATCH_SIZE];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
            loop {
                let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
                    .await
                    .expect("poll_recv");
                assert_eq!(n, 0, "a WireGuard datagram went up to quinn");
            }
        })
    }

    #[tokio::test]
    async fn wireguard_datagrams_go_direct_or_through_a_relay_to_the_driver() {
        let mesh = Mesh::new(3).await;
        let (a, r, b) = (&mesh.sockets[0], &mesh.sockets[1], &mesh.sockets[2]);
        let mut to_b = b.take_wireguard().expect("driver queue");
        assert!(b.take_wireguard().is_none(), "taken once");
        let drivers = [drive_receive(r.clone()), drive_receive(b.clone())];
        // Direct.
        a.send_wireguard(&mesh.short(2), b"\x04direct")
            .await
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), to_b.recv())
            .await
            .expect("in time")
            .expect("datagram");
        assert_eq!(
            (got.from, &got.data[..]),
            (mesh.short(0), &b"\x04direct"[..])
        );
        // Relayed, by the route QUIC uses: the relay forwards without delivering it.
        a.set_route(
            mesh.short(2),
            Some(&[mesh.short(0), mesh.short(1), mesh.short(2)]),
        );
        for i in 0..10u8 {
            a.send_wireguard(&mesh.short(2), &[4, i])
                .await
                .expect("send");
        }
        for i in 0..10u8 {
            let got = tokio::time::timeout(Duration::from_secs(5), to_b.recv())
                .await
                .expect("in time")
                .expect("datagram");
            assert_eq!((got.from, got.data), (mesh.short(0), vec![4, i]));
        }
        assert_eq!(count(&r.counters().relayed_forwarded), 10);
        assert_eq!(count(&r.counters().wireguard_received), 0);
        assert_eq!(count(&b.counters().wireguard_received), 11);
        assert_eq!(count(&a.counters().wireguard_sent), 11);
        // A stranger's WireGuard frame is dropped before any driver sees it.
        let stranger = NodeKey::generate().expect("key").id().short();
        let mut forged = Vec::new();
        frame::append_wireguard_header(&mut forged, stranger);
        forged.extend_from_slice(b"\x01hello");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        udp.send_to(&forged, b.udp_addr().expect("addr"))
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count(&b.counters().non_member), 1);
        assert!(to_b.try_recv().is_err());
        for d in drivers {
            d.abort();
        }
    }

    /// One coalesced buffer mixing every kind of frame: each is judged on its own, the QUIC
    /// packets come up in order with the right sender even when they need more buffers than
    /// are free, and nothing is lost.
    #[tokio::test]
    async fn a_mixed_coalesced_batch_is_demultiplexed_datagram_by_datagram() {
        let mesh = Mesh::new(4).await;
        let (a, r, b, c) = (0, 1, 2, 3);
        let receiver = &mesh.sockets[b];
        let r_keys = LinkKeys::new(&mesh.keys[r], &mesh.members).expect("keys");
        const SEG: usize = 1000;
        let quic = |src: usize, marker: u8, len: usize| {
            let mut f = Vec::new();
            frame::encode_quic_header(&mut f, mesh.short(src));
            f.resize(len, marker);
            f
        };
        let auth = |body_type: BodyType, counter: u64, marker: u8| {
            let mut f = Vec::new();
            frame::encode_auth_header(&mut f, mesh.short(r), mesh.short(b), counter, body_type);
            if body_type == BodyType::Relay {
                frame::encode_relay_header(
                    &mut f,
                    2,
                    &[mesh.short(a), mesh.short(r), mesh.short(b)],
                );
            }
            f.resize(SEG - TAG_LEN, marker);
            let tag = r_keys.tag(&mesh.short(b), &f).expect("tag");
            f.extend_from_slice(&tag);
            f
        };
        let frames = [
            quic(a, 1, SEG),
            quic(a, 2, SEG),
            vec![0xff; SEG],
            quic(c, 4, SEG),
            auth(BodyType::Relay, 10, 5),
            auth(BodyType::Routing, 11, 6),
            quic(a, 7, SEG),
            quic(a, 8, SEG / 2),
        ];
        let batch: Vec<u8> = frames.concat();
        // Sent the way quinn sends: one segmentation-offload send, which loopback hands to
        // a GRO-enabled receiver as one coalesced buffer.
        let sender = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let state = UdpSocketState::new((&sender).into()).expect("state");
        let segment_size = (state.max_gso_segments() > 1).then_some(SEG);
        let transmit = Transmit {
            destination: receiver.udp_addr().expect("addr"),
            ecn: None,
            contents: &batch,
            segment_size,
            src_ip: None,
        };
        if segment_size.is_some() {
            state.send((&sender).into(), &transmit).expect("send");
        } else {
            for f in &frames {
                sender.send_to(f, transmit.destination).await.expect("send");
            }
        }
        let payload = |f: &[u8], skip: usize, tail: usize| f[skip..f.len() - tail].to_vec();
        let relay_skip = frame::relay_overhead(3) - TAG_LEN;
        let expected = vec![
            Got {
                from: mesh.vaddr(a),
                ecn: None,
                data: payload(&frames[0], frame::QUIC_OVERHEAD, 0),
            },
            Got {
                from: mesh.vaddr(a),
                ecn: None,
                data: payload(&frames[1], frame::QUIC_OVERHEAD, 0),
            },
            Got {
                from: mesh.vaddr(c),
                ecn: None,
                data: payload(&frames[3], frame::QUIC_OVERHEAD, 0),
            },
            Got {
                from: mesh.vaddr(a),
                ecn: None,
                data: payload(&frames[4], relay_skip, TAG_LEN),
            },
            Got {
                from: mesh.vaddr(a),
                ecn: None,
                data: payload(&frames[6], frame::QUIC_OVERHEAD, 0),
            },
            Got {
                from: mesh.vaddr(a),
                ecn: None,
                data: payload(&frames[7], frame::QUIC_OVERHEAD, 0),
            },
        ];
        let (got, calls) = receive(receiver, expected.len()).await;
        assert_eq!(got, expected);
        let counters = receiver.counters();
        assert_eq!(count(&counters.malformed), 1);
        assert_eq!(count(&counters.control_received), 1);
        assert_eq!(count(&counters.relayed_received), 1);
        assert_eq!(count(&counters.quic_received), 6);
        if segment_size.is_some() && receiver.max_receive_segments() > 1 {
            // One buffer came in, holding four runs: the first went up at once, the rest
            // from the pending queue on the next call.
            assert_eq!(calls, 2, "the batch arrived coalesced and was split");
        }
    }
}
