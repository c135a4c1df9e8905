//! The mesh socket: one UDP socket per node, seen by quinn as a socket whose peers are
//! node identities.
//!
//! quinn addresses each peer by a *virtual* address ([`virtual_addr`]) built from its
//! [`ShortId`]; the socket maps it to the path datagrams take right now. Because the path
//! lives below QUIC, it can change without QUIC noticing: connections, streams and the
//! websockets riding on them survive a path change.
//!
//! Receiving, the socket demultiplexes frames: QUIC packets go up to quinn, probes are
//! answered at once, and anything malformed or from a non-member is dropped and counted
//! without a reply, so the socket can't be used to amplify traffic.
//!
//! Where a peer is: a configured address ([`MeshSocket::set_peer_addr`]) wins; a member
//! without one (an edge behind NAT) is reached at the address its packets last came from.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::ReadBuf;
use tokio::sync::mpsc;

use super::frame::{self, Frame};
use crate::identity::{NodeId, ShortId};
use crate::membership::Members;

/// First 8 bytes of every virtual address: a unique-local IPv6 prefix that spells "Skylane".
const VIRTUAL_PREFIX: [u8; 8] = [0xfd, 0x53, 0x6b, 0x79, 0x6c, 0x61, 0x6e, 0x65];
/// Port of every virtual address; the address bytes alone name the node.
const VIRTUAL_PORT: u16 = 1;

/// The address quinn uses for a peer.
pub fn virtual_addr(id: &NodeId) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&VIRTUAL_PREFIX);
    octets[8..].copy_from_slice(&id.short().0);
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

/// A probe answer seen by the socket, for whoever measures paths.
#[derive(Clone, Copy, Debug)]
pub struct ProbeReply {
    /// The node that answered.
    pub from: NodeId,
    /// The probe's sequence number.
    pub seq: u64,
    /// The `sent_us` the prober put in the probe.
    pub sent_us: u64,
}

#[derive(Clone, Copy, Debug)]
struct PeerPath {
    addr: SocketAddr,
    /// Set from config or DNS; a learned source address never overrides it.
    configured: bool,
}

/// Counters of what the socket did, for metrics and tests.
#[derive(Debug, Default)]
pub struct SocketCounters {
    /// QUIC datagrams sent.
    pub quic_sent: AtomicU64,
    /// QUIC datagrams passed up to quinn.
    pub quic_received: AtomicU64,
    /// Datagrams that were not valid frames.
    pub malformed: AtomicU64,
    /// Frames from keys that are not members.
    pub non_member: AtomicU64,
    /// Datagrams quinn sent to a peer we have no path to.
    pub no_path: AtomicU64,
    /// Probes answered.
    pub pings_answered: AtomicU64,
}

impl SocketCounters {
    /// The counters as JSON, for status pages.
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "quic_sent": get(&self.quic_sent),
            "quic_received": get(&self.quic_received),
            "malformed": get(&self.malformed),
            "non_member": get(&self.non_member),
            "no_path": get(&self.no_path),
            "pings_answered": get(&self.pings_answered),
        })
    }
}

/// The mesh socket. Create it with [`MeshSocket::bind`], then give it to quinn with
/// [`crate::quic::endpoint`].
pub struct MeshSocket {
    io: tokio::net::UdpSocket,
    local: NodeId,
    members: Members,
    paths: RwLock<HashMap<ShortId, PeerPath>>,
    probe_tx: mpsc::Sender<ProbeReply>,
    probe_rx: std::sync::Mutex<Option<mpsc::Receiver<ProbeReply>>>,
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

impl MeshSocket {
    /// Binds the node's UDP socket.
    pub async fn bind(addr: SocketAddr, local: NodeId, members: Members) -> io::Result<Arc<Self>> {
        let io = tokio::net::UdpSocket::bind(addr).await?;
        Ok(Self::from_tokio(io, local, members))
    }

    /// Wraps an already-bound socket (tests bind `127.0.0.1:0` themselves).
    pub fn from_tokio(io: tokio::net::UdpSocket, local: NodeId, members: Members) -> Arc<Self> {
        // Probe replies are advisory: when the consumer lags, dropping some is fine.
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        Arc::new(Self {
            io,
            local,
            members,
            paths: RwLock::new(HashMap::new()),
            probe_tx,
            probe_rx: std::sync::Mutex::new(Some(probe_rx)),
            counters: SocketCounters::default(),
        })
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

    /// Where a peer's datagrams go now, if anywhere.
    pub fn peer_addr(&self, peer: &NodeId) -> Option<SocketAddr> {
        self.paths
            .read()
            .ok()
            .and_then(|p| p.get(&peer.short()).map(|p| p.addr))
    }

    /// Takes the stream of probe replies (once; later calls get `None`).
    pub fn take_probe_replies(&self) -> Option<mpsc::Receiver<ProbeReply>> {
        self.probe_rx.lock().ok().and_then(|mut rx| rx.take())
    }

    /// Sends a probe to a peer on its current path.
    pub fn send_ping(&self, peer: &NodeId, seq: u64, sent_us: u64) -> io::Result<()> {
        let addr = self
            .peer_addr(peer)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no path to peer"))?;
        let ping = frame::encode_probe(frame::KIND_PING, self.local.short(), seq, sent_us);
        self.io.try_send_to(&ping, addr).map(|_| ())
    }

    fn learn_source(&self, src: ShortId, from: SocketAddr) {
        let known = self.paths.read().ok().and_then(|p| p.get(&src).copied());
        match known {
            Some(p) if p.configured || p.addr == from => {}
            _ => {
                if let Ok(mut paths) = self.paths.write() {
                    paths.insert(
                        src,
                        PeerPath {
                            addr: from,
                            configured: false,
                        },
                    );
                }
            }
        }
    }

    /// Handles one received datagram in place. Returns the QUIC payload's range and the
    /// sender's virtual address when it is a QUIC packet for quinn.
    fn handle_datagram(
        &self,
        buf: &[u8],
        from: SocketAddr,
    ) -> Option<(std::ops::Range<usize>, SocketAddr)> {
        let frame = match frame::decode(buf) {
            Ok(frame) => frame,
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("skylane_mesh_frames_dropped_total", "reason" => e.label())
                    .increment(1);
                tracing::trace!(%from, error = %e, "dropped a malformed datagram");
                return None;
            }
        };
        let src = match frame {
            Frame::Quic { src, .. } | Frame::Ping { src, .. } | Frame::Pong { src, .. } => src,
        };
        let Some(member) = self.members.by_short(&src) else {
            self.counters.non_member.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("skylane_mesh_frames_dropped_total", "reason" => "non_member")
                .increment(1);
            tracing::trace!(%from, "dropped a frame from a non-member");
            return None;
        };
        let member_id = member.id;
        match frame {
            Frame::Quic { payload, .. } => {
                self.learn_source(src, from);
                self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
                Some((
                    buf.len() - payload.len()..buf.len(),
                    virtual_addr(&member_id),
                ))
            }
            Frame::Ping { seq, sent_us, .. } => {
                let pong = frame::encode_probe(frame::KIND_PONG, self.local.short(), seq, sent_us);
                // Answer only to the address the probe came from, at the probe's size: no
                // amplification.
                if self.io.try_send_to(&pong, from).is_ok() {
                    self.counters.pings_answered.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Frame::Pong { seq, sent_us, .. } => {
                let _ = self.probe_tx.try_send(ProbeReply {
                    from: member_id,
                    seq,
                    sent_us,
                });
                None
            }
        }
    }
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
        let Some(path) = self
            .paths
            .read()
            .ok()
            .and_then(|p| p.get(&dst).map(|p| p.addr))
        else {
            // Like a packet lost on the wire: QUIC retransmits once a path exists.
            self.counters.no_path.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            frame::encode_quic_header(&mut buf, self.local.short());
            buf.extend_from_slice(transmit.contents);
            self.io.try_send_to(&buf, path)?;
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
            let Some((range, src)) = self.handle_datagram(&buf[..len], from) else {
                continue;
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
