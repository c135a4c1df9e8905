//! The mesh socket: one UDP socket per node, seen by quinn as a socket whose peers are
//! node identities.
//!
//! quinn addresses each peer by a *virtual* address ([`virtual_addr`]) built from its
//! [`ShortId`]; the socket maps it to the path datagrams take right now — direct, or through
//! one or two relay members, as routing decided ([`MeshSocket::set_route`]). Because the
//! path lives below QUIC, it can change without QUIC noticing: connections, streams and the
//! websockets riding on them survive a path change. Relays forward QUIC ciphertext they
//! cannot read.
//!
//! WireGuard datagrams ride the same paths ([`MeshSocket::send_wireguard`]): direct, or relayed
//! by the same relays, which forward them unopened; at their end they go to the node's
//! WireGuard driver ([`MeshSocket::take_wireguard`]) instead of quinn.
//!
//! Receiving, the socket demultiplexes frames: direct QUIC packets go up to quinn; routing
//! and membership datagrams go to the node's control loop ([`MeshSocket::take_control`]);
//! relayed packets are forwarded to the next hop or, at their end, go up to quinn as if they
//! came from the path's first node. Authenticated frames (see [`super::auth`]) are checked
//! before anything else: a frame from a non-member, with a bad tag, addressed to another
//! node, or replayed is dropped and counted without a reply, so no node can be used as a
//! relay or reflector by anyone outside the mesh.
//!
//! Where a peer is: a configured address ([`MeshSocket::set_peer_addr`]) wins; a member
//! without one (an edge behind NAT) is reached at the address its authenticated frames
//! last came from.
//!
//! The UDP socket is driven through quinn-udp ([`UdpSocketState`]), as quinn drives its own
//! sockets: several QUIC packets leave in one segmentation-offload (GSO) send, each behind
//! its own mesh header; datagrams arrive many per `recvmmsg`, several per buffer when the
//! kernel coalesces them (GRO), and each is checked and demultiplexed on its own. The
//! don't-fragment bit is set, so quinn can discover the path MTU.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll, ready};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::auth::{AuthError, LinkKeys, ReplayWindow, TAG_LEN};
use super::frame::{self, AuthFrame, BodyType, Frame, MAX_RELAY_PATH};
use crate::identity::{NodeId, NodeKey, ShortId};
use crate::membership::Members;

/// First 8 bytes of every virtual address: a unique-local IPv6 prefix that spells "Skylane".
const VIRTUAL_PREFIX: [u8; 8] = [0xfd, 0x53, 0x6b, 0x79, 0x6c, 0x61, 0x6e, 0x65];
/// Port of every virtual address; the address bytes alone name the node.
const VIRTUAL_PORT: u16 = 1;
/// Socket buffer size asked of the kernel, each way.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Control datagrams waiting for the control loop; beyond this they are dropped (routing
/// and membership tolerate loss).
const CONTROL_QUEUE: usize = 4096;
/// WireGuard datagrams waiting for the WireGuard driver; beyond this they are dropped, as
/// on a congested link (the TCP flows inside send them again).
const WIREGUARD_QUEUE: usize = 4096;
/// Most bytes of relayed frames forwarded in one segmentation-offload send: below the
/// largest UDP payload of IPv4 (65,507), whatever the frames' size.
const FORWARD_MAX_BYTES: usize = 65_000;

/// The address quinn uses for a peer.
pub fn virtual_addr(id: &NodeId) -> SocketAddr {
    virtual_addr_of(&id.short())
}

fn virtual_addr_of(short: &ShortId) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&VIRTUAL_PREFIX);
    octets[8..].copy_from_slice(&short.0);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), VIRTUAL_PORT)
}

/// The node a virtual address stands for, if it is one.
pub fn short_id_of(addr: &SocketAddr) -> Option<ShortId> {
    let IpAddr::V6(v6) = addr.ip() else {
        return None;
    };
    let o = v6.octets();
    if o[..8] != VIRTUAL_PREFIX {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&o[8..]);
    Some(ShortId(s))
}

/// A WireGuard datagram that reached this node, for its WireGuard driver.
#[derive(Clone, Debug)]
pub struct WireguardDatagram {
    /// The member it claims to come from (the first node of its path); the WireGuard
    /// session of that member authenticates it.
    pub from: ShortId,
    /// The datagram.
    pub data: Vec<u8>,
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

#[derive(Clone, Copy, Debug)]
struct PeerPath {
    addr: SocketAddr,
    /// Set from config or DNS; a learned source address never overrides it.
    configured: bool,
}

/// A relayed route: every node from this one to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RelayRoute {
    nodes: [ShortId; MAX_RELAY_PATH],
    len: usize,
}

impl RelayRoute {
    fn nodes(&self) -> &[ShortId] {
        &self.nodes[..self.len]
    }
}

/// Counters of what the socket did, for metrics and tests.
#[derive(Debug, Default)]
pub struct SocketCounters {
    /// QUIC datagrams sent (direct or into a relayed path); a segmentation-offload send
    /// counts each datagram in it.
    pub quic_sent: AtomicU64,
    /// QUIC datagrams passed up to quinn.
    pub quic_received: AtomicU64,
    /// Datagrams (QUIC or WireGuard) sent on a relayed path.
    pub relayed_sent: AtomicU64,
    /// Relayed datagrams forwarded for other nodes.
    pub relayed_forwarded: AtomicU64,
    /// Relayed datagrams (QUIC or WireGuard) that reached this node as their destination.
    pub relayed_received: AtomicU64,
    /// Control datagrams (routing, membership) sent and received.
    pub control_sent: AtomicU64,
    /// Control datagrams received.
    pub control_received: AtomicU64,
    /// Datagrams that were not valid frames.
    pub malformed: AtomicU64,
    /// Frames from keys that are not members.
    pub non_member: AtomicU64,
    /// Authenticated frames whose tag did not verify (forged or altered).
    pub bad_tag: AtomicU64,
    /// Authenticated frames seen before (replayed) or too old.
    pub replayed: AtomicU64,
    /// Authenticated frames addressed to another node, or relayed along a path that does not
    /// fit where they arrived.
    pub misrouted: AtomicU64,
    /// Datagrams quinn sent to a peer we have no path to.
    pub no_path: AtomicU64,
    /// Control datagrams dropped because the control loop lagged.
    pub control_dropped: AtomicU64,
    /// WireGuard datagrams sent (direct or into a relayed path).
    pub wireguard_sent: AtomicU64,
    /// WireGuard datagrams handed to the WireGuard driver.
    pub wireguard_received: AtomicU64,
    /// WireGuard datagrams dropped: no driver, or it lagged.
    pub wireguard_dropped: AtomicU64,
}

impl SocketCounters {
    /// The counters as JSON, for status pages.
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "quic_sent": get(&self.quic_sent),
            "quic_received": get(&self.quic_received),
            "relayed_sent": get(&self.relayed_sent),
            "relayed_forwarded": get(&self.relayed_forwarded),
            "relayed_received": get(&self.relayed_received),
            "control_sent": get(&self.control_sent),
            "control_received": get(&self.control_received),
            "malformed": get(&self.malformed),
            "non_member": get(&self.non_member),
            "bad_tag": get(&self.bad_tag),
            "replayed": get(&self.replayed),
            "misrouted": get(&self.misrouted),
            "no_path": get(&self.no_path),
            "control_dropped": get(&self.control_dropped),
            "wireguard_sent": get(&self.wireguard_sent),
            "wireguard_received": get(&self.wireguard_received),
            "wireguard_dropped": get(&self.wireguard_dropped),
        })
    }
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
    local: NodeId,
    members: Members,
    keys: LinkKeys,
    /// Next counter of an authenticated frame; starts at the clock in µs so it grows across
    /// restarts and receivers' replay windows accept the restarted node at once.
    counter: AtomicU64,
    windows: Mutex<HashMap<ShortId, ReplayWindow>>,
    paths: RwLock<HashMap<ShortId, PeerPath>>,
    /// Destinations routed through relays; absent means direct.
    routes: RwLock<HashMap<ShortId, RelayRoute>>,
    control_tx: mpsc::Sender<ControlDatagram>,
    control_rx: Mutex<Option<mpsc::Receiver<ControlDatagram>>>,
    wireguard_tx: mpsc::Sender<WireguardDatagram>,
    wireguard_rx: Mutex<Option<mpsc::Receiver<WireguardDatagram>>>,
    counters: SocketCounters,
}

impl fmt::Debug for MeshSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSocket")
            .field("local", &self.local)
            .field("udp", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Why a datagram was dropped on receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropReason {
    Malformed(&'static str),
    NonMember,
    BadTag,
    Replayed,
    Misrouted,
    ControlQueueFull,
    WireguardQueueFull,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::Malformed(label) => label,
            DropReason::NonMember => "non_member",
            DropReason::BadTag => "bad_tag",
            DropReason::Replayed => "replayed",
            DropReason::Misrouted => "misrouted",
            DropReason::ControlQueueFull => "control_queue_full",
            DropReason::WireguardQueueFull => "wireguard_queue_full",
        }
    }
}

/// What became of a received datagram.
enum Received {
    /// A QUIC packet for quinn: where it lies in the datagram, and its sender.
    Quic(Range<usize>, SocketAddr),
    /// Consumed here (control datagram queued, relayed packet queued for the next hop).
    Consumed,
    Dropped(DropReason),
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

/// A QUIC packet waiting in [`RecvState::pending`].
struct PendingPacket {
    /// The virtual address of its sender.
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: Vec<u8>,
}

/// Relayed frames on their way to the next hop, built back to back so that a run of
/// equal-size frames to one address (as a coalesced buffer of them usually is) leaves in one
/// segmentation-offload send instead of one syscall each.
#[derive(Default)]
struct ForwardBatch {
    buf: Vec<u8>,
    /// Where every frame in `buf` goes, with which ECN mark.
    to: Option<(SocketAddr, Option<EcnCodepoint>)>,
    /// Size of every frame but a shorter last one: the segment size.
    frame_len: usize,
    frames: usize,
}

impl ForwardBatch {
    /// Whether a frame of `len` bytes to `addr` can join the batch: GSO sends equal-size
    /// segments to one address, of which only the last may be shorter.
    fn takes(
        &self,
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        max_frames: usize,
    ) -> bool {
        self.frames == 0
            || (self.to == Some((addr, ecn))
                && len <= self.frame_len
                && self.buf.len() == self.frames * self.frame_len
                && self.frames < max_frames
                && self.buf.len() + len <= FORWARD_MAX_BYTES)
    }
}

/// Packs QUIC packets into the buffers quinn lends `poll_recv`. One `RecvMeta` describes a
/// buffer of packets from one (virtual) source with one ECN mark, all `stride` bytes but a
/// shorter last one; a packet that breaks that starts the next buffer.
#[derive(Default)]
struct Packer {
    /// The run being filled; buffers before its slot hold finished runs.
    run: Option<Run>,
}

#[derive(Clone, Copy)]
struct Run {
    slot: usize,
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    stride: usize,
    len: usize,
}

impl Run {
    fn takes(
        &self,
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        capacity: usize,
    ) -> bool {
        self.addr == addr
            && self.ecn == ecn
            && len <= self.stride
            // A packet shorter than the stride ended the run.
            && self.len.is_multiple_of(self.stride)
            && self.len + len <= capacity
    }

    fn meta(&self) -> RecvMeta {
        RecvMeta {
            addr: self.addr,
            len: self.len,
            stride: self.stride,
            ecn: self.ecn,
            // The packet's destination is this node's virtual address, which quinn knows;
            // the real local IP means nothing to it.
            dst_ip: None,
        }
    }
}

impl Packer {
    /// Where a packet of `len` bytes goes, as (buffer, offset), or `None` if it needs a
    /// buffer past `last_slot` (or fits none). Packets must be placed in arrival order.
    fn place(
        &mut self,
        meta: &mut [RecvMeta],
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        capacity: usize,
        last_slot: usize,
    ) -> Option<(usize, usize)> {
        if let Some(run) = &mut self.run
            && run.takes(addr, ecn, len, capacity)
        {
            let at = run.len;
            run.len += len;
            return Some((run.slot, at));
        }
        let slot = self.run.map_or(0, |run| run.slot + 1);
        if slot > last_slot || len > capacity || len == 0 {
            return None;
        }
        if let Some(run) = self.run {
            meta[run.slot] = run.meta();
        }
        self.run = Some(Run {
            slot,
            addr,
            ecn,
            stride: len,
            len,
        });
        Some((slot, 0))
    }

    /// Writes the last run's meta; returns how many buffers hold packets.
    fn finish(self, meta: &mut [RecvMeta]) -> usize {
        match self.run {
            Some(run) => {
                meta[run.slot] = run.meta();
                run.slot + 1
            }
            None => 0,
        }
    }
}

/// Copies `range` of buffer `from` to offset `at` of buffer `to`.
fn copy_between(
    bufs: &mut [IoSliceMut<'_>],
    from: usize,
    range: Range<usize>,
    to: usize,
    at: usize,
) {
    let end = at + range.len();
    if from == to {
        bufs[to].copy_within(range, at);
    } else if to < from {
        let (low, high) = bufs.split_at_mut(from);
        low[to][at..end].copy_from_slice(&high[0][range]);
    } else {
        let (low, high) = bufs.split_at_mut(to);
        high[0][at..end].copy_from_slice(&low[from][range]);
    }
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
        let keys = LinkKeys::new(key, &members)?;
        for name in keys.unusable() {
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
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(Arc::new(Self {
            io,
            state,
            recv: Mutex::new(RecvState::default()),
            local: key.id(),
            members,
            keys,
            counter: AtomicU64::new(start.max(1)),
            windows: Mutex::new(HashMap::new()),
            paths: RwLock::new(HashMap::new()),
            routes: RwLock::new(HashMap::new()),
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
            wireguard_tx,
            wireguard_rx: Mutex::new(Some(wireguard_rx)),
            counters: SocketCounters::default(),
        }))
    }

    /// The UDP address the socket is bound to.
    pub fn udp_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// This node's identity.
    pub fn local_id(&self) -> NodeId {
        self.local
    }

    /// The member list the socket enforces.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// What the socket has counted so far.
    pub fn counters(&self) -> &SocketCounters {
        &self.counters
    }

    /// Sets where a peer's datagrams go (from config or a DNS answer).
    pub fn set_peer_addr(&self, peer: &NodeId, addr: SocketAddr) {
        if let Ok(mut paths) = self.paths.write() {
            paths.insert(
                peer.short(),
                PeerPath {
                    addr,
                    configured: true,
                },
            );
        }
    }

    /// Where a peer's datagrams go on the direct path, if anywhere.
    pub fn peer_addr(&self, peer: &NodeId) -> Option<SocketAddr> {
        self.direct_addr(&peer.short())
    }

    fn direct_addr(&self, peer: &ShortId) -> Option<SocketAddr> {
        self.paths
            .read()
            .ok()
            .and_then(|p| p.get(peer).map(|p| p.addr))
    }

    /// Sets the path QUIC datagrams to `path`'s last node take: `path` lists every node
    /// from this one to the destination; two nodes (or `None`) mean direct. Takes effect
    /// with the next datagram.
    pub fn set_route(&self, destination: ShortId, path: Option<&[ShortId]>) {
        let Ok(mut routes) = self.routes.write() else {
            return;
        };
        match path {
            Some(nodes) if (3..=MAX_RELAY_PATH).contains(&nodes.len()) => {
                let mut route = RelayRoute {
                    nodes: [ShortId([0; 8]); MAX_RELAY_PATH],
                    len: nodes.len(),
                };
                route.nodes[..nodes.len()].copy_from_slice(nodes);
                routes.insert(destination, route);
            }
            _ => {
                routes.remove(&destination);
            }
        }
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
        if datagram.is_empty() {
            return Ok(());
        }
        let relayed = self.routes.read().ok().and_then(|r| r.get(to).copied());
        if relayed.is_some() {
            self.counters.relayed_sent.fetch_add(1, Ordering::Relaxed);
        }
        let sent = match relayed {
            Some(route) => self.send_relayed(
                1,
                route.nodes(),
                datagram,
                datagram.len(),
                None,
                BodyType::RelayWireguard,
            ),
            None => match self.direct_addr(to) {
                None => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no address for peer",
                )),
                Some(addr) => SEND_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.clear();
                    frame::append_wireguard_header(&mut buf, self.local.short());
                    buf.extend_from_slice(datagram);
                    self.io.try_send_to(&buf, addr).map(|_| ())
                }),
            },
        };
        match sent {
            Ok(()) => {
                self.counters.wireguard_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.counters.no_path.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Hands a WireGuard datagram to the driver.
    fn deliver_wireguard(&self, from: ShortId, data: &[u8]) -> Received {
        let datagram = WireguardDatagram {
            from,
            data: data.to_vec(),
        };
        if self.wireguard_tx.try_send(datagram).is_err() {
            return Received::Dropped(DropReason::WireguardQueueFull);
        }
        self.counters
            .wireguard_received
            .fetch_add(1, Ordering::Relaxed);
        Received::Consumed
    }

    /// Sends a routing or membership datagram to a peer on the direct path.
    pub fn send_control(&self, to: &ShortId, body_type: BodyType, body: &[u8]) -> io::Result<()> {
        let addr = self
            .direct_addr(to)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no address for peer"))?;
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            frame::encode_auth_header(
                &mut buf,
                self.local.short(),
                *to,
                self.next_counter(),
                body_type,
            );
            buf.extend_from_slice(body);
            self.seal(&mut buf, to)?;
            self.io.try_send_to(&buf, addr)?;
            self.counters.control_sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn next_counter(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends the tag for the link to `to`.
    fn seal(&self, buf: &mut Vec<u8>, to: &ShortId) -> io::Result<()> {
        let tag = self.keys.tag(to, buf).ok_or_else(|| {
            io::Error::new(io::ErrorKind::PermissionDenied, "no link key for peer")
        })?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Sends `packets`, QUIC packets of `segment` bytes each (the last may be shorter), as
    /// relay hop `hop` of `path` (addressed to `path[hop]`): each in its own authenticated
    /// frame, with its own counter and tag, all in one segmentation-offload send.
    fn send_relayed(
        &self,
        hop: usize,
        path: &[ShortId],
        packets: &[u8],
        segment: usize,
        ecn: Option<EcnCodepoint>,
        body_type: BodyType,
    ) -> io::Result<()> {
        let next = *path
            .get(hop)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "hop outside the path"))?;
        let addr = self
            .direct_addr(&next)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no address for relay"))?;
        let segment = segment.max(1);
        let count = packets.len().div_ceil(segment) as u64;
        // One atomic step reserves a counter for every frame of the batch.
        let first = self.counter.fetch_add(count, Ordering::Relaxed);
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            for (counter, packet) in (first..).zip(packets.chunks(segment)) {
                let start = buf.len();
                frame::append_auth_header(&mut buf, self.local.short(), next, counter, body_type);
                frame::encode_relay_header(&mut buf, hop, path);
                buf.extend_from_slice(packet);
                let tag = self.keys.tag(&next, &buf[start..]).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::PermissionDenied, "no link key for peer")
                })?;
                buf.extend_from_slice(&tag);
            }
            self.send_segments(addr, ecn, &buf, segment + frame::relay_overhead(path.len()))
        })
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
        let Some((addr, ecn)) = batch.to.take() else {
            return;
        };
        let frames = batch.frames as u64;
        match self.send_segments(addr, ecn, &batch.buf, batch.frame_len) {
            Ok(()) => {
                self.counters
                    .relayed_forwarded
                    .fetch_add(frames, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.no_path.fetch_add(frames, Ordering::Relaxed);
                tracing::trace!(error = %e, frames, "could not forward relayed datagrams");
            }
        }
        batch.buf.clear();
        batch.frames = 0;
        batch.frame_len = 0;
    }

    /// Frames `payload` as relay hop `hop` of `path` into the forward batch, sending the
    /// batch first if the frame can't join it.
    fn forward_relayed(
        &self,
        batch: &mut ForwardBatch,
        hop: usize,
        path: &[ShortId],
        payload: &[u8],
        ecn: Option<EcnCodepoint>,
        body_type: BodyType,
    ) {
        let Some(&next) = path.get(hop) else {
            return;
        };
        let Some(addr) = self.direct_addr(&next) else {
            self.counters.no_path.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(next = %next, "no address for the next hop of a relayed datagram");
            return;
        };
        let len = frame::relay_overhead(path.len()) + payload.len();
        if !batch.takes(addr, ecn, len, self.state.max_gso_segments()) {
            self.flush_forward(batch);
        }
        let start = batch.buf.len();
        frame::append_auth_header(
            &mut batch.buf,
            self.local.short(),
            next,
            self.next_counter(),
            body_type,
        );
        frame::encode_relay_header(&mut batch.buf, hop, path);
        batch.buf.extend_from_slice(payload);
        let Some(tag) = self.keys.tag(&next, &batch.buf[start..]) else {
            batch.buf.truncate(start);
            self.counters.no_path.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(next = %next, "no link key for the next hop of a relayed datagram");
            return;
        };
        batch.buf.extend_from_slice(&tag);
        if batch.frames == 0 {
            batch.to = Some((addr, ecn));
            batch.frame_len = len;
        }
        batch.frames += 1;
    }

    fn learn_source(&self, src: ShortId, from: SocketAddr, authenticated: bool) {
        let known = self.paths.read().ok().and_then(|p| p.get(&src).copied());
        // Only an authenticated frame teaches or moves an address. A QUIC frame's source is
        // a claim anyone can forge: learning from it would let a stranger pin a member whose
        // address is not known yet, and turn this node's answers towards any address.
        let learn = authenticated
            && match known {
                None => true,
                Some(p) => !p.configured && p.addr != from,
            };
        if learn && let Ok(mut paths) = self.paths.write() {
            paths.insert(
                src,
                PeerPath {
                    addr: from,
                    configured: false,
                },
            );
        }
    }

    fn count_drop(&self, drop: DropReason, from: SocketAddr) {
        let counter = match drop {
            DropReason::Malformed(_) => &self.counters.malformed,
            DropReason::NonMember => &self.counters.non_member,
            DropReason::BadTag => &self.counters.bad_tag,
            DropReason::Replayed => &self.counters.replayed,
            DropReason::Misrouted => &self.counters.misrouted,
            DropReason::ControlQueueFull => &self.counters.control_dropped,
            DropReason::WireguardQueueFull => &self.counters.wireguard_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("skylane_mesh_frames_dropped_total", "reason" => drop.label())
            .increment(1);
        tracing::trace!(%from, reason = drop.label(), "dropped a datagram");
    }

    /// Handles one received datagram in place. `ecn` is its mark, passed on if it is
    /// forwarded; relayed frames for the next hop are added to `forward`.
    fn handle_datagram(
        &self,
        buf: &[u8],
        from: SocketAddr,
        ecn: Option<EcnCodepoint>,
        forward: &mut ForwardBatch,
    ) -> Received {
        let frame = match frame::decode(buf) {
            Ok(frame) => frame,
            Err(e) => return Received::Dropped(DropReason::Malformed(e.label())),
        };
        match frame {
            Frame::Quic { src, payload } => {
                let Some(member) = self.members.by_short(&src) else {
                    return Received::Dropped(DropReason::NonMember);
                };
                self.learn_source(src, from, false);
                self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
                Received::Quic(
                    buf.len() - payload.len()..buf.len(),
                    virtual_addr(&member.id),
                )
            }
            Frame::Wireguard { src, payload } => {
                if self.members.by_short(&src).is_none() {
                    return Received::Dropped(DropReason::NonMember);
                }
                // The sender's id travels in clear: only the member's own address may use
                // it, so a stranger cannot load that member's WireGuard session (its
                // handshake rate limit, its queue) with replayed or forged datagrams.
                if self.direct_addr(&src) != Some(from) {
                    return Received::Dropped(DropReason::Misrouted);
                }
                self.deliver_wireguard(src, payload)
            }
            Frame::Auth(auth) => self.handle_auth(buf, auth, from, ecn, forward),
        }
    }

    fn handle_auth(
        &self,
        buf: &[u8],
        auth: AuthFrame<'_>,
        from: SocketAddr,
        ecn: Option<EcnCodepoint>,
        forward: &mut ForwardBatch,
    ) -> Received {
        if self.members.by_short(&auth.src).is_none() {
            return Received::Dropped(DropReason::NonMember);
        }
        if auth.dst != self.local.short() {
            return Received::Dropped(DropReason::Misrouted);
        }
        if !self.keys.verify(&auth.src, auth.signed, auth.tag) {
            return Received::Dropped(DropReason::BadTag);
        }
        let fresh = self
            .windows
            .lock()
            .map(|mut w| w.entry(auth.src).or_default().accept(auth.counter))
            .unwrap_or(false);
        if !fresh {
            return Received::Dropped(DropReason::Replayed);
        }
        self.learn_source(auth.src, from, true);
        match auth.body_type {
            BodyType::Routing | BodyType::Swim | BodyType::Bulletin => {
                let datagram = ControlDatagram {
                    from: auth.src,
                    body_type: auth.body_type,
                    body: auth.body.to_vec(),
                };
                if self.control_tx.try_send(datagram).is_err() {
                    return Received::Dropped(DropReason::ControlQueueFull);
                }
                self.counters
                    .control_received
                    .fetch_add(1, Ordering::Relaxed);
                Received::Consumed
            }
            BodyType::Relay | BodyType::RelayWireguard => {
                self.handle_relay(buf, &auth, ecn, forward)
            }
        }
    }

    fn handle_relay(
        &self,
        buf: &[u8],
        auth: &AuthFrame<'_>,
        ecn: Option<EcnCodepoint>,
        forward: &mut ForwardBatch,
    ) -> Received {
        let relay = match frame::decode_relay(auth.body) {
            Ok(relay) => relay,
            Err(e) => return Received::Dropped(DropReason::Malformed(e.label())),
        };
        let path = relay.path();
        let me = self.local.short();
        // The hop must be addressed to us by the node before us on the path, and every node
        // on the path must be a member, each once.
        let fits = path[relay.hop] == me
            && path[relay.hop - 1] == auth.src
            && path.iter().all(|n| self.members.by_short(n).is_some())
            && path
                .iter()
                .enumerate()
                .all(|(i, n)| !path[i + 1..].contains(n));
        if !fits {
            return Received::Dropped(DropReason::Misrouted);
        }
        if relay.hop + 1 == path.len() {
            let Some(origin) = self.members.by_short(&path[0]) else {
                return Received::Dropped(DropReason::NonMember);
            };
            self.counters
                .relayed_received
                .fetch_add(1, Ordering::Relaxed);
            if auth.body_type == BodyType::RelayWireguard {
                return self.deliver_wireguard(path[0], relay.payload);
            }
            self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
            let end = buf.len() - TAG_LEN;
            return Received::Quic(end - relay.payload.len()..end, virtual_addr(&origin.id));
        }
        // The ECN mark travels on, so congestion the first hop saw reaches the receiver.
        self.forward_relayed(
            forward,
            relay.hop + 1,
            path,
            relay.payload,
            ecn,
            auth.body_type,
        );
        Received::Consumed
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
        let capacity = bufs[..count].iter().map(|b| b.len()).min().unwrap_or(0);
        let mut packer = Packer::default();
        let mut spilling = false;
        for i in 0..count {
            // Copied: the packer may rewrite this meta once buffer `i` is read.
            let received = meta[i];
            let len = received.len.min(bufs[i].len());
            if len == 0 {
                self.count_drop(DropReason::Malformed("empty"), received.addr);
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
                let outcome = self.handle_datagram(
                    &bufs[i][datagram.clone()],
                    received.addr,
                    received.ecn,
                    &mut state.forward,
                );
                let (range, src) = match outcome {
                    Received::Quic(range, src) => (range, src),
                    Received::Consumed => continue,
                    Received::Dropped(drop) => {
                        self.count_drop(drop, received.addr);
                        continue;
                    }
                };
                let payload = datagram.start + range.start..datagram.start + range.end;
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

/// Moves packets from `pending` into quinn's buffers, in order, as many as fit.
fn deliver_pending(
    pending: &mut VecDeque<PendingPacket>,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    slots: usize,
) -> usize {
    let capacity = bufs[..slots].iter().map(|b| b.len()).min().unwrap_or(0);
    let mut packer = Packer::default();
    while let Some(packet) = pending.front() {
        let len = packet.data.len();
        match packer.place(meta, packet.addr, packet.ecn, len, capacity, slots - 1) {
            Some((slot, at)) => bufs[slot][at..at + len].copy_from_slice(&packet.data),
            // Fits no buffer at all (quinn lent smaller ones than before): lost, as on the
            // wire.
            None if packer.run.is_none() => {}
            None => break,
        }
        pending.pop_front();
    }
    packer.finish(meta)
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
        Box::pin(WritablePoller {
            socket: self,
            pending: None,
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
        if contents.is_empty() {
            return Ok(());
        }
        // With segmentation offload, quinn hands over several QUIC packets of
        // `segment_size` bytes (the last may be shorter); each gets its own mesh frame.
        let segment = transmit
            .segment_size
            .filter(|&s| s > 0)
            .unwrap_or(contents.len())
            .min(contents.len());
        let packets = contents.len().div_ceil(segment) as u64;
        let relayed = self.routes.read().ok().and_then(|r| r.get(&dst).copied());
        if let Some(route) = relayed {
            return match self.send_relayed(
                1,
                route.nodes(),
                contents,
                segment,
                transmit.ecn,
                BodyType::Relay,
            ) {
                Ok(()) => {
                    self.counters
                        .quic_sent
                        .fetch_add(packets, Ordering::Relaxed);
                    self.counters
                        .relayed_sent
                        .fetch_add(packets, Ordering::Relaxed);
                    Ok(())
                }
                // Like packets lost on the wire: QUIC retransmits, routing fails over.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    self.counters.no_path.fetch_add(packets, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        let Some(addr) = self.direct_addr(&dst) else {
            self.counters.no_path.fetch_add(packets, Ordering::Relaxed);
            return Ok(());
        };
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            for packet in contents.chunks(segment) {
                frame::append_quic_header(&mut buf, self.local.short());
                buf.extend_from_slice(packet);
            }
            self.send_segments(addr, transmit.ecn, &buf, segment + frame::QUIC_OVERHEAD)?;
            self.counters
                .quic_sent
                .fetch_add(packets, Ordering::Relaxed);
            Ok(())
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
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
        Ok(virtual_addr(&self.local))
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

/// Waits for the UDP socket to become writable; one per quinn task that sends.
struct WritablePoller {
    socket: Arc<MeshSocket>,
    pending: Option<Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritablePoller").finish_non_exhaustive()
    }
}

impl UdpPoller for WritablePoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.pending.get_or_insert_with(|| {
            let socket = this.socket.clone();
            Box::pin(async move { socket.io.writable().await })
        });
        let result = fut.as_mut().poll(cx);
        if result.is_ready() {
            this.pending = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    use std::time::Duration;

    #[test]
    fn virtual_addresses_round_trip() {
        let id = NodeKey::generate().expect("key").id();
        let addr = virtual_addr(&id);
        assert_eq!(short_id_of(&addr), Some(id.short()));
        assert_eq!(short_id_of(&"127.0.0.1:1".parse().expect("addr")), None);
    }

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

    /// Pending packets fill the buffers quinn lends, as runs, and what does not fit waits.
    #[test]
    fn pending_packets_are_delivered_in_order_across_calls() {
        let x: SocketAddr = "[fd00::1]:1".parse().expect("addr");
        let y: SocketAddr = "[fd00::2]:1".parse().expect("addr");
        let sizes = [(x, 100), (x, 100), (x, 40), (y, 100), (x, 100), (x, 120)];
        let mut pending: VecDeque<PendingPacket> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| PendingPacket {
                addr,
                ecn: None,
                data: vec![i as u8; len],
            })
            .collect();
        let mut storage = vec![vec![0u8; 250]; 2];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); 2];
        // Runs: [x 100,100,40] [y 100] | [x 100] [x 120].
        let n = deliver_pending(&mut pending, &mut bufs, &mut meta, 2);
        assert_eq!(n, 2);
        assert_eq!((meta[0].addr, meta[0].len, meta[0].stride), (x, 240, 100));
        assert_eq!(&bufs[0][200..240], &[2u8; 40][..]);
        assert_eq!((meta[1].addr, meta[1].len, meta[1].stride), (y, 100, 100));
        assert_eq!(pending.len(), 2);
        let n = deliver_pending(&mut pending, &mut bufs, &mut meta, 2);
        assert_eq!(n, 2);
        assert_eq!((meta[0].addr, meta[0].len, meta[0].stride), (x, 100, 100));
        assert_eq!((meta[1].addr, meta[1].len, meta[1].stride), (x, 120, 120));
        assert_eq!(&bufs[1][..120], &[5u8; 120][..]);
        assert!(pending.is_empty());
    }
}
