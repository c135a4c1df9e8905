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

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::ReadBuf;
use tokio::sync::mpsc;

use super::auth::{AuthError, LinkKeys, ReplayWindow, TAG_LEN};
use super::frame::{self, AuthFrame, BodyType, Frame, MAX_RELAY_PATH};
use crate::identity::{NodeId, NodeKey, ShortId};
use crate::membership::Members;

/// First 8 bytes of every virtual address: a unique-local IPv6 prefix that spells "Skylane".
const VIRTUAL_PREFIX: [u8; 8] = [0xfd, 0x53, 0x6b, 0x79, 0x6c, 0x61, 0x6e, 0x65];
/// Port of every virtual address; the address bytes alone name the node.
const VIRTUAL_PORT: u16 = 1;
/// Control datagrams waiting for the control loop; beyond this they are dropped (routing
/// and membership tolerate loss).
const CONTROL_QUEUE: usize = 4096;

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
    /// QUIC datagrams sent (direct or into a relayed path).
    pub quic_sent: AtomicU64,
    /// QUIC datagrams passed up to quinn.
    pub quic_received: AtomicU64,
    /// QUIC datagrams sent on a relayed path.
    pub relayed_sent: AtomicU64,
    /// Relayed datagrams forwarded for other nodes.
    pub relayed_forwarded: AtomicU64,
    /// Relayed datagrams that reached this node as their destination.
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
        })
    }
}

/// The mesh socket. Create it with [`MeshSocket::bind`], then give it to quinn with
/// [`crate::quic::endpoint`].
pub struct MeshSocket {
    io: tokio::net::UdpSocket,
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
        }
    }
}

/// What became of a received datagram.
enum Received {
    /// A QUIC packet for quinn: where it lies in the buffer, and its sender.
    Quic(std::ops::Range<usize>, SocketAddr),
    /// Consumed here (control datagram queued, relayed packet forwarded).
    Consumed,
    Dropped(DropReason),
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

    /// Wraps an already-bound socket (tests bind `127.0.0.1:0` themselves).
    pub fn from_tokio(
        io: tokio::net::UdpSocket,
        key: &NodeKey,
        members: Members,
    ) -> Result<Arc<Self>, BindError> {
        let keys = LinkKeys::new(key, &members)?;
        for name in keys.unusable() {
            tracing::warn!(member = %name, "member's public key is not usable for link keys; it can't relay or be relayed to");
        }
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(Arc::new(Self {
            io,
            local: key.id(),
            members,
            keys,
            counter: AtomicU64::new(start.max(1)),
            windows: Mutex::new(HashMap::new()),
            paths: RwLock::new(HashMap::new()),
            routes: RwLock::new(HashMap::new()),
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
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

    /// Sends `payload` as relay hop `hop` of `path` (addressed to `path[hop]`).
    fn send_relayed(&self, hop: usize, path: &[ShortId], payload: &[u8]) -> io::Result<()> {
        let next = path[hop];
        let addr = self
            .direct_addr(&next)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no address for relay"))?;
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            frame::encode_auth_header(
                &mut buf,
                self.local.short(),
                next,
                self.next_counter(),
                BodyType::Relay,
            );
            frame::encode_relay_header(&mut buf, hop, path);
            buf.extend_from_slice(payload);
            self.seal(&mut buf, &next)?;
            self.io.try_send_to(&buf, addr)?;
            Ok(())
        })
    }

    fn learn_source(&self, src: ShortId, from: SocketAddr, authenticated: bool) {
        let known = self.paths.read().ok().and_then(|p| p.get(&src).copied());
        let learn = match known {
            None => true,
            // Only an authenticated frame may move a known peer: a forged QUIC header must
            // not divert a member's traffic.
            Some(p) => !p.configured && p.addr != from && authenticated,
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
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("skylane_mesh_frames_dropped_total", "reason" => drop.label())
            .increment(1);
        tracing::trace!(%from, reason = drop.label(), "dropped a datagram");
    }

    /// Handles one received datagram in place.
    fn handle_datagram(&self, buf: &[u8], from: SocketAddr) -> Received {
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
            Frame::Auth(auth) => self.handle_auth(buf, auth, from),
        }
    }

    fn handle_auth(&self, buf: &[u8], auth: AuthFrame<'_>, from: SocketAddr) -> Received {
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
            BodyType::Routing | BodyType::Swim => {
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
            BodyType::Relay => self.handle_relay(buf, &auth),
        }
    }

    fn handle_relay(&self, buf: &[u8], auth: &AuthFrame<'_>) -> Received {
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
            self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
            let end = buf.len() - TAG_LEN;
            return Received::Quic(end - relay.payload.len()..end, virtual_addr(&origin.id));
        }
        match self.send_relayed(relay.hop + 1, path, relay.payload) {
            Ok(()) => {
                self.counters
                    .relayed_forwarded
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.no_path.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(error = %e, "could not forward a relayed datagram");
            }
        }
        Received::Consumed
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
        let relayed = self.routes.read().ok().and_then(|r| r.get(&dst).copied());
        if let Some(route) = relayed {
            return match self.send_relayed(1, route.nodes(), transmit.contents) {
                Ok(()) => {
                    self.counters.quic_sent.fetch_add(1, Ordering::Relaxed);
                    self.counters.relayed_sent.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                // Like a packet lost on the wire: QUIC retransmits, routing fails over.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    self.counters.no_path.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        let Some(addr) = self.direct_addr(&dst) else {
            self.counters.no_path.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            frame::encode_quic_header(&mut buf, self.local.short());
            buf.extend_from_slice(transmit.contents);
            self.io.try_send_to(&buf, addr)?;
            self.counters.quic_sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let buf: &mut [u8] = &mut bufs[filled];
            let mut read = ReadBuf::new(buf);
            let from = match self.io.poll_recv_from(cx, &mut read) {
                Poll::Ready(Ok(from)) => from,
                // An ICMP error reported for an earlier send says nothing about this
                // receive; a dead path is the prober's business, not quinn's.
                Poll::Ready(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue;
                }
                Poll::Ready(Err(e)) if filled == 0 => return Poll::Ready(Err(e)),
                Poll::Pending if filled == 0 => return Poll::Pending,
                Poll::Ready(Err(_)) | Poll::Pending => break,
            };
            let len = read.filled().len();
            let (range, src) = match self.handle_datagram(&buf[..len], from) {
                Received::Quic(range, src) => (range, src),
                Received::Consumed => continue,
                Received::Dropped(drop) => {
                    self.count_drop(drop, from);
                    continue;
                }
            };
            let payload_len = range.len();
            buf.copy_within(range, 0);
            let m = &mut meta[filled];
            *m = RecvMeta::default();
            m.addr = src;
            m.len = payload_len;
            m.stride = payload_len;
            filled += 1;
        }
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(virtual_addr(&self.local))
    }

    fn may_fragment(&self) -> bool {
        // Without DF set we can't promise the path won't fragment; quinn then keeps to
        // its conservative initial MTU instead of probing.
        true
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

    #[test]
    fn virtual_addresses_round_trip() {
        let id = NodeKey::generate().expect("key").id();
        let addr = virtual_addr(&id);
        assert_eq!(short_id_of(&addr), Some(id.short()));
        assert_eq!(short_id_of(&"127.0.0.1:1".parse().expect("addr")), None);
    }
}
