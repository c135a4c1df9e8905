//! The mesh socket's sans-IO core: what every datagram is, and how every datagram is
//! framed. No socket and no clock: the caller passes received bytes, their source and the
//! time, and gets back a decision; it passes what it wants sent and gets back the frame
//! bytes and where they go. The real socket ([`super::socket::MeshSocket`]) and the
//! virtual-time network of the simulator drive the same code.
//!
//! Receiving, [`MeshCore::classify`] borrows the datagram and returns an [`Inbound`]:
//!
//! - [`Inbound::Quic`]: a QUIC packet for quinn (direct, or at the end of a relayed path),
//!   with the virtual address of the member that sent it;
//! - [`Inbound::Wireguard`]: a WireGuard datagram for the WireGuard driver, likewise;
//! - [`Inbound::Control`]: an authenticated routing, membership or bulletin datagram;
//! - [`Inbound::Forward`]: a relayed frame for the next hop; [`MeshCore::seal_forward`]
//!   frames it, and the caller sends it (the packet inside is neither opened nor copied
//!   twice);
//! - [`Inbound::Drop`]: not for anyone, with the reason; it is already counted.
//!
//! Authenticated frames (see [`super::auth`]) are checked before anything else: a frame
//! from a non-member, with a bad tag, addressed to another node, relayed along a path that
//! does not fit, or replayed is dropped without a reply, so no node can be used as a relay
//! or reflector by anyone outside the mesh.
//!
//! Sending, [`MeshCore::frame_quic`], [`MeshCore::frame_wireguard`] and
//! [`MeshCore::frame_control`] append frames to the caller's buffer, on the path routing
//! chose ([`PeerTable::set_route`]), and return an [`Outbound`]: the UDP address and the
//! frames' size, ready for one segmentation-offload send.
//!
//! The member list and the link keys may be replaced while datagrams flow
//! ([`MeshCore::set_members`]); each datagram is judged by the list in force when it
//! arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::addr::virtual_addr;
use super::auth::{AuthError, LinkKeys, ReplayWindow, TAG_LEN};
use super::frame::{self, AuthFrame, BodyType, Frame, MAX_RELAY_PATH};
use super::peers::{PeerTable, RelayRoute};
use crate::identity::{NodeId, NodeKey, ShortId};
use crate::membership::Members;
use crate::routing::Timestamp;

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
    /// Datagrams to a peer we have no path to (sent by us, or to forward).
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

/// Why a datagram was dropped on receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a frame; the label says why.
    Malformed(&'static str),
    /// From a key that is not a member.
    NonMember,
    /// Its tag did not verify.
    BadTag,
    /// Seen before, or too old.
    Replayed,
    /// Addressed to another node, relayed along a path that does not fit, or a direct
    /// WireGuard frame from another address than its member's.
    Misrouted,
    /// A relayed frame whose next hop has no address or link key.
    NoPath,
    /// The control loop lagged.
    ControlQueueFull,
    /// The WireGuard driver lagged, or there is none.
    WireguardQueueFull,
}

impl DropReason {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed(label) => label,
            DropReason::NonMember => "non_member",
            DropReason::BadTag => "bad_tag",
            DropReason::Replayed => "replayed",
            DropReason::Misrouted => "misrouted",
            DropReason::NoPath => "no_path",
            DropReason::ControlQueueFull => "control_queue_full",
            DropReason::WireguardQueueFull => "wireguard_queue_full",
        }
    }
}

/// What a received datagram is; see the module docs.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A QUIC packet for quinn.
    Quic {
        /// Where the packet lies in the datagram, so the caller can move it in place.
        packet: Range<usize>,
        /// The virtual address of the member that sent it (the first node of its path).
        from: SocketAddr,
    },
    /// A WireGuard datagram for the WireGuard driver.
    Wireguard {
        /// The member it comes from (the first node of its path); its WireGuard session
        /// authenticates it.
        from: ShortId,
        /// The WireGuard datagram.
        datagram: &'a [u8],
    },
    /// A routing, membership or bulletin datagram, authenticated, for the control loop.
    Control {
        /// The member that sent it (one hop away).
        from: ShortId,
        /// Which of the three.
        body_type: BodyType,
        /// The datagram.
        body: &'a [u8],
    },
    /// A relayed frame for the next hop; see [`MeshCore::seal_forward`].
    Forward(Forward<'a>),
    /// A member asks this node to send a WireGuard datagram to a stock endpoint, from a
    /// UDP socket of this node's (it carries the member's tunnel through this node).
    ToEndpoint {
        /// The member whose tunnel it is.
        from: ShortId,
        /// The stock endpoint.
        endpoint: SocketAddr,
        /// The WireGuard datagram.
        datagram: &'a [u8],
    },
    /// A relay brings a datagram that a stock endpoint sent to it for this node.
    FromEndpoint {
        /// The relay.
        via: ShortId,
        /// The stock endpoint it came from.
        endpoint: SocketAddr,
        /// The WireGuard datagram.
        datagram: &'a [u8],
    },
    /// Dropped (and counted) for this reason.
    Drop(DropReason),
}

/// A relayed packet on its way through this node.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward<'a> {
    /// The next hop's UDP address.
    pub to: SocketAddr,
    route: RelayRoute,
    /// The index of the next hop in the path.
    hop: usize,
    body_type: BodyType,
    /// The packet inside, unopened.
    payload: &'a [u8],
}

impl Forward<'_> {
    /// The size of the frame [`MeshCore::seal_forward`] will append.
    pub fn frame_len(&self) -> usize {
        frame::relay_overhead(self.route.nodes().len()) + self.payload.len()
    }
}

/// Frames ready to send: where to, and their size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// The UDP address of the next hop.
    pub to: SocketAddr,
    /// The size of every frame but a shorter last one (the segment size of one
    /// segmentation-offload send).
    pub frame_len: usize,
    /// How many frames were appended.
    pub frames: usize,
    /// Whether they go into a relayed path.
    pub relayed: bool,
}

/// Why frames could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameSendError {
    /// The destination (or the first relay) has no address yet: like a packet lost on the
    /// wire, the protocol above retransmits and routing looks for another path.
    #[error("no address for the peer")]
    NoPath,
    /// The peer has no usable link key (its public key is not a curve point).
    #[error("no link key for the peer")]
    NoLinkKey,
    /// Not something that can be sent (an empty datagram, a segment size of zero).
    #[error("nothing to send")]
    Empty,
}

/// The member list in force and the link keys derived from it.
struct Trust {
    members: Members,
    keys: LinkKeys,
}

/// The sans-IO mesh socket; see the module docs.
pub struct MeshCore {
    local: NodeId,
    key: NodeKey,
    trust: ArcSwap<Trust>,
    /// Next counter of an authenticated frame.
    counter: AtomicU64,
    windows: Mutex<HashMap<ShortId, ReplayWindow>>,
    peers: PeerTable,
    counters: SocketCounters,
}

impl std::fmt::Debug for MeshCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCore")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl MeshCore {
    /// The core of node `key` in the mesh `members`. `first_counter` numbers its first
    /// authenticated frame; give it something that grows across restarts (the wall clock in
    /// µs), so receivers' replay windows accept a restarted node at once.
    pub fn new(key: &NodeKey, members: Members, first_counter: u64) -> Result<Self, AuthError> {
        let keys = LinkKeys::new(key, &members)?;
        Ok(Self {
            local: key.id(),
            key: key.clone(),
            trust: ArcSwap::from_pointee(Trust { members, keys }),
            counter: AtomicU64::new(first_counter.max(1)),
            windows: Mutex::new(HashMap::new()),
            peers: PeerTable::default(),
            counters: SocketCounters::default(),
        })
    }

    /// This node's identity.
    pub fn local_id(&self) -> NodeId {
        self.local
    }

    /// The member list in force.
    pub fn members(&self) -> Members {
        self.trust.load().members.clone()
    }

    /// Members whose public key gives no link key; they can't relay or be relayed to.
    pub fn unusable_members(&self) -> Vec<String> {
        self.trust.load().keys.unusable().to_vec()
    }

    /// Replaces the member list: frames from removed members are refused from the next
    /// datagram on, and added ones accepted. Their addresses and routes stay in the peer
    /// table until the caller changes them.
    pub fn set_members(&self, members: Members) -> Result<(), AuthError> {
        let keys = LinkKeys::new(&self.key, &members)?;
        if let Ok(mut windows) = self.windows.lock() {
            windows.retain(|id, _| members.by_short(id).is_some());
        }
        self.trust.store(Arc::new(Trust { members, keys }));
        Ok(())
    }

    /// Where each member is and which path datagrams to it take.
    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    /// What the core has counted so far.
    pub fn counters(&self) -> &SocketCounters {
        &self.counters
    }

    fn next_counters(&self, count: u64) -> u64 {
        // One atomic step reserves a counter for every frame of a batch.
        self.counter.fetch_add(count, Ordering::Relaxed)
    }

    /// Judges one received datagram. `from` is its UDP source, `now` the time it arrived.
    /// Drops are counted here; the caller counts what it does with the rest.
    pub fn classify<'a>(
        &self,
        now: Timestamp,
        datagram: &'a [u8],
        from: SocketAddr,
    ) -> Inbound<'a> {
        let inbound = self.judge(now, datagram, from);
        if let Inbound::Drop(reason) = inbound {
            self.count_drop(reason, from);
        }
        inbound
    }

    fn judge<'a>(&self, now: Timestamp, datagram: &'a [u8], from: SocketAddr) -> Inbound<'a> {
        let frame = match frame::decode(datagram) {
            Ok(frame) => frame,
            Err(e) => return Inbound::Drop(DropReason::Malformed(e.label())),
        };
        let trust = self.trust.load();
        match frame {
            Frame::Quic { src, .. } => {
                let Some(member) = trust.members.by_short(&src) else {
                    return Inbound::Drop(DropReason::NonMember);
                };
                self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
                Inbound::Quic {
                    packet: frame::QUIC_OVERHEAD..datagram.len(),
                    from: virtual_addr(&member.id),
                }
            }
            Frame::Wireguard { src, payload } => {
                if trust.members.by_short(&src).is_none() {
                    return Inbound::Drop(DropReason::NonMember);
                }
                // The sender's id travels in clear: only an address the member sends from
                // (its own, or where its authenticated frames come from) may use it, so a
                // stranger cannot load that member's WireGuard session (its handshake rate
                // limit, its queue) with replayed or forged datagrams.
                if !self.peers.sends_from(&src, from) {
                    return Inbound::Drop(DropReason::Misrouted);
                }
                Inbound::Wireguard {
                    from: src,
                    datagram: payload,
                }
            }
            Frame::Auth(auth) => self.judge_auth(now, &trust, datagram, auth, from),
        }
    }

    fn judge_auth<'a>(
        &self,
        now: Timestamp,
        trust: &Trust,
        datagram: &'a [u8],
        auth: AuthFrame<'a>,
        from: SocketAddr,
    ) -> Inbound<'a> {
        if trust.members.by_short(&auth.src).is_none() {
            return Inbound::Drop(DropReason::NonMember);
        }
        if auth.dst != self.local.short() {
            return Inbound::Drop(DropReason::Misrouted);
        }
        if !trust.keys.verify(&auth.src, auth.signed, auth.tag) {
            return Inbound::Drop(DropReason::BadTag);
        }
        let fresh = self
            .windows
            .lock()
            .map(|mut w| w.entry(auth.src).or_default().accept(auth.counter))
            .unwrap_or(false);
        if !fresh {
            return Inbound::Drop(DropReason::Replayed);
        }
        self.peers.heard_from(auth.src, from, now);
        match auth.body_type {
            BodyType::Routing | BodyType::Swim | BodyType::Bulletin => Inbound::Control {
                from: auth.src,
                body_type: auth.body_type,
                body: auth.body,
            },
            BodyType::Relay | BodyType::RelayWireguard => {
                self.judge_relay(trust, datagram.len(), &auth)
            }
            BodyType::ToEndpoint | BodyType::FromEndpoint => {
                let (endpoint, datagram) = match frame::decode_endpoint(auth.body) {
                    Ok(parsed) => parsed,
                    Err(e) => return Inbound::Drop(DropReason::Malformed(e.label())),
                };
                if auth.body_type == BodyType::ToEndpoint {
                    Inbound::ToEndpoint {
                        from: auth.src,
                        endpoint,
                        datagram,
                    }
                } else {
                    Inbound::FromEndpoint {
                        via: auth.src,
                        endpoint,
                        datagram,
                    }
                }
            }
        }
    }

    fn judge_relay<'a>(&self, trust: &Trust, len: usize, auth: &AuthFrame<'a>) -> Inbound<'a> {
        let relay = match frame::decode_relay(auth.body) {
            Ok(relay) => relay,
            Err(e) => return Inbound::Drop(DropReason::Malformed(e.label())),
        };
        let path = relay.path();
        let me = self.local.short();
        // The hop must be addressed to us by the node before us on the path, and every node
        // on the path must be a member, each once.
        let fits = path[relay.hop] == me
            && path[relay.hop - 1] == auth.src
            && path.iter().all(|n| trust.members.by_short(n).is_some())
            && path
                .iter()
                .enumerate()
                .all(|(i, n)| !path[i + 1..].contains(n));
        if !fits {
            return Inbound::Drop(DropReason::Misrouted);
        }
        if relay.hop + 1 == path.len() {
            let Some(origin) = trust.members.by_short(&path[0]) else {
                return Inbound::Drop(DropReason::NonMember);
            };
            self.counters
                .relayed_received
                .fetch_add(1, Ordering::Relaxed);
            if auth.body_type == BodyType::RelayWireguard {
                return Inbound::Wireguard {
                    from: path[0],
                    datagram: relay.payload,
                };
            }
            self.counters.quic_received.fetch_add(1, Ordering::Relaxed);
            let end = len - TAG_LEN;
            return Inbound::Quic {
                packet: end - relay.payload.len()..end,
                from: virtual_addr(&origin.id),
            };
        }
        let hop = relay.hop + 1;
        let Some(to) = self.peers.addr(&path[hop]) else {
            return Inbound::Drop(DropReason::NoPath);
        };
        let Some(route) = RelayRoute::new(path) else {
            return Inbound::Drop(DropReason::Misrouted);
        };
        Inbound::Forward(Forward {
            to,
            route,
            hop,
            body_type: auth.body_type,
            payload: relay.payload,
        })
    }

    /// Appends the frame that carries `forward` to its next hop to `out`. On error nothing
    /// is appended and the packet counts as lost.
    pub fn seal_forward(
        &self,
        forward: &Forward<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameSendError> {
        let counter = self.next_counters(1);
        let sealed = self.append_relay_frames(
            out,
            counter,
            forward.hop,
            forward.route.nodes(),
            forward.payload,
            forward.payload.len().max(1),
            forward.body_type,
        );
        if sealed.is_err() {
            self.counters.no_path.fetch_add(1, Ordering::Relaxed);
        }
        sealed
    }

    /// Appends `packets`, QUIC packets of `segment` bytes each (the last may be shorter), to
    /// `out`, each in its own frame towards the member `to`, on the path routing chose.
    pub fn frame_quic(
        &self,
        to: &ShortId,
        packets: &[u8],
        segment: usize,
        out: &mut Vec<u8>,
    ) -> Result<Outbound, FrameSendError> {
        self.frame_data(to, packets, segment, out, BodyType::Relay)
    }

    /// Appends one WireGuard datagram to `out`, in a frame towards the member `to`, on the
    /// path QUIC datagrams to it take.
    pub fn frame_wireguard(
        &self,
        to: &ShortId,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Outbound, FrameSendError> {
        self.frame_data(to, datagram, datagram.len(), out, BodyType::RelayWireguard)
    }

    fn frame_data(
        &self,
        to: &ShortId,
        packets: &[u8],
        segment: usize,
        out: &mut Vec<u8>,
        relay_type: BodyType,
    ) -> Result<Outbound, FrameSendError> {
        if packets.is_empty() || segment == 0 {
            return Err(FrameSendError::Empty);
        }
        let segment = segment.min(packets.len());
        let frames = packets.len().div_ceil(segment);
        if let Some(route) = self.peers.route(to) {
            let path = route.nodes();
            let next = self.peers.addr(&path[1]).ok_or(FrameSendError::NoPath)?;
            let first = self.next_counters(frames as u64);
            self.append_relay_frames(out, first, 1, path, packets, segment, relay_type)?;
            return Ok(Outbound {
                to: next,
                frame_len: segment + frame::relay_overhead(path.len()),
                frames,
                relayed: true,
            });
        }
        let addr = self.peers.addr(to).ok_or(FrameSendError::NoPath)?;
        let me = self.local.short();
        for packet in packets.chunks(segment) {
            match relay_type {
                BodyType::RelayWireguard => frame::append_wireguard_header(out, me),
                _ => frame::append_quic_header(out, me),
            }
            out.extend_from_slice(packet);
        }
        Ok(Outbound {
            to: addr,
            frame_len: segment + frame::QUIC_OVERHEAD,
            frames,
            relayed: false,
        })
    }

    /// Appends an authenticated routing, membership or bulletin datagram for the member
    /// `to` to `out`; it goes on the direct path.
    pub fn frame_control(
        &self,
        to: &ShortId,
        body_type: BodyType,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Outbound, FrameSendError> {
        let addr = self.peers.addr(to).ok_or(FrameSendError::NoPath)?;
        let start = out.len();
        frame::append_auth_header(
            out,
            self.local.short(),
            *to,
            self.next_counters(1),
            body_type,
        );
        out.extend_from_slice(body);
        self.append_tag(out, start, to)?;
        Ok(Outbound {
            to: addr,
            frame_len: out.len() - start,
            frames: 1,
            relayed: false,
        })
    }

    /// Appends a frame that carries a WireGuard datagram of a tunnel to the stock
    /// `endpoint` between this node and the member `to`, on the direct path:
    /// [`BodyType::ToEndpoint`] asks `to` to send it to the endpoint,
    /// [`BodyType::FromEndpoint`] brings `to` what the endpoint sent.
    pub fn frame_endpoint(
        &self,
        to: &ShortId,
        body_type: BodyType,
        endpoint: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Outbound, FrameSendError> {
        if datagram.is_empty()
            || !matches!(body_type, BodyType::ToEndpoint | BodyType::FromEndpoint)
        {
            return Err(FrameSendError::Empty);
        }
        let addr = self.peers.addr(to).ok_or(FrameSendError::NoPath)?;
        let start = out.len();
        frame::append_auth_header(
            out,
            self.local.short(),
            *to,
            self.next_counters(1),
            body_type,
        );
        frame::encode_endpoint_header(out, endpoint);
        out.extend_from_slice(datagram);
        self.append_tag(out, start, to)?;
        Ok(Outbound {
            to: addr,
            frame_len: out.len() - start,
            frames: 1,
            relayed: false,
        })
    }

    /// Appends one RELAY frame per packet of `packets` (`segment` bytes each, the last may
    /// be shorter) as hop `hop` of `path`, numbered from `first_counter`. On error `out` is
    /// left as it was.
    #[allow(clippy::too_many_arguments)]
    fn append_relay_frames(
        &self,
        out: &mut Vec<u8>,
        first_counter: u64,
        hop: usize,
        path: &[ShortId],
        packets: &[u8],
        segment: usize,
        body_type: BodyType,
    ) -> Result<(), FrameSendError> {
        debug_assert!(path.len() <= MAX_RELAY_PATH && hop > 0 && hop < path.len());
        let next = path[hop];
        let start = out.len();
        for (counter, packet) in (first_counter..).zip(packets.chunks(segment)) {
            let frame_start = out.len();
            frame::append_auth_header(out, self.local.short(), next, counter, body_type);
            frame::encode_relay_header(out, hop, path);
            out.extend_from_slice(packet);
            if let Err(e) = self.append_tag(out, frame_start, &next) {
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Appends the tag over `out[start..]` for the link to `to`.
    fn append_tag(
        &self,
        out: &mut Vec<u8>,
        start: usize,
        to: &ShortId,
    ) -> Result<(), FrameSendError> {
        let Some(tag) = self.trust.load().keys.tag(to, &out[start..]) else {
            out.truncate(start);
            return Err(FrameSendError::NoLinkKey);
        };
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Counts a dropped datagram (metrics, counters, a trace line).
    pub fn count_drop(&self, drop: DropReason, from: SocketAddr) {
        let counter = match drop {
            DropReason::Malformed(_) => &self.counters.malformed,
            DropReason::NonMember => &self.counters.non_member,
            DropReason::BadTag => &self.counters.bad_tag,
            DropReason::Replayed => &self.counters.replayed,
            DropReason::Misrouted => &self.counters.misrouted,
            DropReason::NoPath => &self.counters.no_path,
            DropReason::ControlQueueFull => &self.counters.control_dropped,
            DropReason::WireguardQueueFull => &self.counters.wireguard_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("skylane_mesh_frames_dropped_total", "reason" => drop.label())
            .increment(1);
        tracing::trace!(%from, reason = drop.label(), "dropped a datagram");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three cores `a`, `r`, `b` that know each other's (made-up) addresses.
    struct Trio {
        cores: Vec<MeshCore>,
        addrs: Vec<SocketAddr>,
    }

    impl Trio {
        fn new() -> Self {
            let keys: Vec<NodeKey> = (0..3).map(|_| NodeKey::generate().expect("key")).collect();
            let members = crate::membership::test_members(&keys);
            let addrs: Vec<SocketAddr> = (0..3)
                .map(|i| format!("192.0.2.{}:7000", i + 1).parse().expect("addr"))
                .collect();
            let cores: Vec<MeshCore> = keys
                .iter()
                .map(|k| MeshCore::new(k, members.clone(), 1).expect("core"))
                .collect();
            for core in &cores {
                for (j, key) in keys.iter().enumerate() {
                    core.peers().set_addr(key.id().short(), addrs[j]);
                }
            }
            Self { cores, addrs }
        }

        fn short(&self, i: usize) -> ShortId {
            self.cores[i].local_id().short()
        }

        fn index_of(&self, addr: SocketAddr) -> usize {
            self.addrs.iter().position(|a| *a == addr).expect("a node")
        }
    }

    const T: Timestamp = Timestamp::ZERO;

    #[test]
    fn a_relayed_packet_is_forwarded_unopened_and_delivered_at_the_end() {
        let t = Trio::new();
        let (a, r, b) = (0, 1, 2);
        t.cores[a]
            .peers()
            .set_route(t.short(b), Some(&[t.short(a), t.short(r), t.short(b)]));
        for (body, quic) in [(&b"quic packet"[..], true), (&b"\x04wireguard"[..], false)] {
            let mut out = Vec::new();
            let sent = if quic {
                t.cores[a].frame_quic(&t.short(b), body, body.len(), &mut out)
            } else {
                t.cores[a].frame_wireguard(&t.short(b), body, &mut out)
            }
            .expect("framed");
            assert!(sent.relayed);
            assert_eq!(t.index_of(sent.to), r);
            let Inbound::Forward(fwd) = t.cores[r].classify(T, &out, t.addrs[a]) else {
                panic!("not forwarded");
            };
            assert_eq!(t.index_of(fwd.to), b);
            let mut next = Vec::new();
            t.cores[r].seal_forward(&fwd, &mut next).expect("sealed");
            assert_eq!(next.len(), fwd.frame_len());
            match t.cores[b].classify(T, &next, t.addrs[r]) {
                Inbound::Quic { packet, from } => {
                    assert!(quic);
                    assert_eq!(&next[packet], body);
                    assert_eq!(from, virtual_addr(&t.cores[a].local_id()));
                }
                Inbound::Wireguard { from, datagram } => {
                    assert!(!quic);
                    assert_eq!((from, datagram), (t.short(a), body));
                }
                other => panic!("{other:?}"),
            }
            // The same frame again is a replay, at the relay and at the end.
            assert_eq!(
                t.cores[b].classify(T, &next, t.addrs[r]),
                Inbound::Drop(DropReason::Replayed)
            );
        }
        assert_eq!(t.cores[r].counters().replayed.load(Ordering::Relaxed), 0);
        assert_eq!(t.cores[b].counters().replayed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn control_frames_are_authenticated_and_teach_nothing_when_forged() {
        let t = Trio::new();
        let mut out = Vec::new();
        let sent = t.cores[0]
            .frame_control(&t.short(1), BodyType::Swim, b"ping", &mut out)
            .expect("framed");
        assert_eq!(t.index_of(sent.to), 1);
        let later = Timestamp::from_millis(3);
        assert_eq!(
            t.cores[1].classify(later, &out, t.addrs[0]),
            Inbound::Control {
                from: t.short(0),
                body_type: BodyType::Swim,
                body: b"ping"
            }
        );
        let view = t.cores[1].peers().view(&t.short(0)).expect("known");
        assert_eq!(view.heard, Some(later));
        // One bit changed: a bad tag. Sent to the wrong node: misrouted.
        let mut altered = out.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(
            t.cores[1].classify(T, &altered, t.addrs[0]),
            Inbound::Drop(DropReason::BadTag)
        );
        assert_eq!(
            t.cores[2].classify(T, &out, t.addrs[0]),
            Inbound::Drop(DropReason::Misrouted)
        );
        assert_eq!(
            t.cores[1].classify(T, b"\x00garbage", t.addrs[0]),
            Inbound::Drop(DropReason::Malformed("unknown_kind"))
        );
    }

    #[test]
    fn stock_endpoint_datagrams_travel_one_hop_each_way() {
        let t = Trio::new();
        let endpoint: SocketAddr = "198.51.100.20:51820".parse().expect("addr");
        let mut out = Vec::new();
        let sent = t.cores[0]
            .frame_endpoint(
                &t.short(1),
                BodyType::ToEndpoint,
                endpoint,
                b"\x01init",
                &mut out,
            )
            .expect("framed");
        assert_eq!(t.index_of(sent.to), 1);
        assert_eq!(
            t.cores[1].classify(T, &out, t.addrs[0]),
            Inbound::ToEndpoint {
                from: t.short(0),
                endpoint,
                datagram: b"\x01init"
            }
        );
        out.clear();
        t.cores[1]
            .frame_endpoint(
                &t.short(0),
                BodyType::FromEndpoint,
                endpoint,
                b"\x02resp",
                &mut out,
            )
            .expect("framed");
        assert_eq!(
            t.cores[0].classify(T, &out, t.addrs[1]),
            Inbound::FromEndpoint {
                via: t.short(1),
                endpoint,
                datagram: b"\x02resp"
            }
        );
        // Not for a third node, and not twice.
        assert_eq!(
            t.cores[2].classify(T, &out, t.addrs[1]),
            Inbound::Drop(DropReason::Misrouted)
        );
        assert_eq!(
            t.cores[0].classify(T, &out, t.addrs[1]),
            Inbound::Drop(DropReason::Replayed)
        );
    }

    #[test]
    fn a_removed_member_is_refused_from_the_next_datagram() {
        let t = Trio::new();
        let mut out = Vec::new();
        t.cores[0]
            .frame_control(&t.short(1), BodyType::Routing, b"x", &mut out)
            .expect("framed");
        let without_a: Vec<_> = t.cores[1]
            .members()
            .iter()
            .filter(|m| m.id != t.cores[0].local_id())
            .cloned()
            .collect();
        t.cores[1]
            .set_members(Members::new(without_a).expect("members"))
            .expect("keys");
        assert_eq!(
            t.cores[1].classify(T, &out, t.addrs[0]),
            Inbound::Drop(DropReason::NonMember)
        );
    }

    #[test]
    fn nothing_is_framed_without_an_address() {
        let t = Trio::new();
        let stranger = ShortId([9; 8]);
        let mut out = Vec::new();
        assert_eq!(
            t.cores[0].frame_quic(&stranger, b"p", 1, &mut out),
            Err(FrameSendError::NoPath)
        );
        assert_eq!(
            t.cores[0].frame_quic(&t.short(1), b"", 1, &mut out),
            Err(FrameSendError::Empty)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn segmented_quic_packets_get_a_frame_each() {
        let t = Trio::new();
        let mut out = Vec::new();
        let packets = [7u8; 250];
        let sent = t.cores[0]
            .frame_quic(&t.short(1), &packets, 100, &mut out)
            .expect("framed");
        assert_eq!(sent.frames, 3);
        assert_eq!(sent.frame_len, 100 + frame::QUIC_OVERHEAD);
        assert_eq!(out.len(), 250 + 3 * frame::QUIC_OVERHEAD);
        let lens: Vec<usize> = out
            .chunks(sent.frame_len)
            .map(|f| match t.cores[1].classify(T, f, t.addrs[0]) {
                Inbound::Quic { packet, .. } => packet.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lens, vec![100, 100, 50]);
    }
}
