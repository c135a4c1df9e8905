//! [`Swim`]: which mesh members are alive, suspect or down, agreed by the SWIM protocol
//! (the `foca` crate), sans-IO.
//!
//! The member list is static and configured; SWIM's only job here is liveness, with indirect
//! probes so that one broken direct path does not get a healthy node declared down, and
//! suspicion so that the whole mesh agrees when a node really crashes. This module does not
//! measure paths (that is [`crate::routing`]), does not authenticate (the mesh socket has
//! already checked each frame's hop-by-hop MAC, so `from` is a trusted member), and never
//! learns members from the network: identities outside the configured list are ignored and
//! counted.
//!
//! # Driving it
//!
//! [`Swim`] owns no socket and no clock; it is driven like [`crate::routing::Router`]:
//!
//! 1. Create it with [`Swim::new`], then call [`Swim::join`] once.
//! 2. Whenever a SWIM datagram arrives from a member, call [`Swim::handle_datagram`].
//! 3. At [`Swim::poll_timeout`], call [`Swim::handle_timeout`].
//! 4. After any of the calls above, drain [`Swim::poll_transmit`] (send each payload to that
//!    member, on whatever path routing picks) and [`Swim::poll_event`] (members going up and
//!    down).
//! 5. Read [`Swim::is_alive`], [`Swim::members`] and [`Swim::counters`] at any time.
//!
//! # Identities and restarts
//!
//! On the wire a member is `(ShortId, generation)`. Only the [`ShortId`] names the member;
//! the generation lets a node that was declared down come back: SWIM never revives a down
//! identity, so the node renews itself with the next generation (foca's `Identity::renew`) and
//! the newer generation wins. A freshly started node begins at generation 0 and, as soon as it
//! hears the mesh talk about a higher generation of itself, jumps past it, so a restart is
//! accepted within a round trip or two and reported [`MemberEvent::Up`] again.
//!
//! # Wire format
//!
//! foca's postcard codec (`foca::PostcardCodec`): compact varints, no schema negotiation, and
//! the same serde + postcard stack as the rest of the wire protocol. A datagram is a header
//! followed by a big-endian `u16` count and that many piggybacked membership updates; it is at
//! most [`SwimConfig::max_packet_size`] bytes ([`MAX_PACKET_SIZE_LIMIT`] at most, so that it
//! fits in one mesh frame).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{
    Foca, Header, Member, Message, NoCustomBroadcast, Notification, OwnedNotification,
    PeriodicParams, PostcardCodec, Runtime, State, Timer,
};
use rand::RngCore as _;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::identity::ShortId;
use crate::routing::Timestamp;

/// The largest [`SwimConfig::max_packet_size`] accepted: a SWIM datagram travels inside one
/// 1200-byte mesh frame, which also carries a header and a 16-byte tag.
pub const MAX_PACKET_SIZE_LIMIT: usize = 1100;

/// The smallest [`SwimConfig::max_packet_size`] accepted: room for a header and a handful of
/// piggybacked updates (each about 12 bytes).
pub const MIN_PACKET_SIZE: usize = 128;

/// SWIM tuning. The defaults suit a WAN mesh of 5 to 100 nodes with round-trip times up to
/// 350 ms; each field documents its default and trade-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwimConfig {
    /// How often this node probes one member (members are probed round-robin in a shuffled
    /// order). Default 1500 ms: the direct wait ([`Self::probe_rtt_ms`], 500 ms) plus 1000 ms
    /// for the indirect cycle, which takes four one-way trips (us → helper → target → helper →
    /// us), 700 ms on the slowest 350 ms-RTT paths. Shorter detects crashes sooner but costs
    /// more datagrams and risks indirect probes arriving after the cycle ended.
    pub probe_period_ms: u64,
    /// How long to wait for a direct ack before asking other members to probe indirectly.
    /// Default 500 ms: above the largest expected RTT (350 ms) plus queueing jitter. Too low
    /// triggers needless indirect probes; too high leaves less of the period for them. Must be
    /// below [`Self::probe_period_ms`].
    pub probe_rtt_ms: u64,
    /// How many members are asked to probe a member that did not answer directly. Default 3
    /// (as in the SWIM paper and memberlist): a suspect needs all of them to fail too, so one
    /// broken path never causes suspicion. More costs datagrams only when probes fail.
    pub num_indirect_probes: usize,
    /// How long a member stays suspect before it is declared down, giving it time to hear of
    /// the suspicion and refute it. Default 3000 ms: two probe periods, enough for the
    /// suspicion to reach the member by periodic gossip and its refutation to come back across
    /// the slowest paths. Longer is more tolerant of lossy links; shorter detects crashes
    /// sooner. Detection time is roughly the wait until someone probes the dead member (about
    /// one or two periods), plus one period, plus this, plus dissemination.
    pub suspect_to_down_ms: u64,
    /// How many times each membership update is piggybacked before it is dropped. Default 8,
    /// memberlist's `4 × log10(N + 1)` for N = 100: every node hears of a change with high
    /// probability. Smaller meshes over-send a little, and updates are about 12 bytes each.
    pub max_transmissions: u8,
    /// The largest datagram produced or accepted, in bytes. Default and maximum
    /// [`MAX_PACKET_SIZE_LIMIT`] (1100). Smaller packets carry fewer piggybacked updates.
    pub max_packet_size: usize,
    /// How often pending updates are also pushed to [`Self::gossip_fanout`] random members,
    /// besides riding on probes. Default 300 ms; nothing is sent when there is nothing new, so
    /// it costs bytes only while membership changes. 0 disables it (slower dissemination).
    pub gossip_interval_ms: u64,
    /// How many members each periodic gossip goes to. Default 3.
    pub gossip_fanout: usize,
    /// How often this node announces itself to one random live member, which replies with
    /// its view; this heals partial views. Default 30 000 ms; each reply is up to a full packet,
    /// so shorter costs bandwidth for little gain with a static member list. 0 disables it.
    pub announce_interval_ms: u64,
    /// How often this node announces itself to two random members it believes down, so that a
    /// healed partition or a restarted node is noticed. Default 10 000 ms. 0 disables it.
    pub down_announce_interval_ms: u64,
    /// While this node knows no live member (at start, or when cut off), how often it
    /// announces itself to every configured member. Default 5000 ms: a lone node finds the mesh
    /// again within this long; announces are tiny and stop as soon as one member answers.
    pub isolated_announce_interval_ms: u64,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            probe_period_ms: 1500,
            probe_rtt_ms: 500,
            num_indirect_probes: 3,
            suspect_to_down_ms: 3000,
            max_transmissions: 8,
            max_packet_size: MAX_PACKET_SIZE_LIMIT,
            gossip_interval_ms: 300,
            gossip_fanout: 3,
            announce_interval_ms: 30_000,
            down_announce_interval_ms: 10_000,
            isolated_announce_interval_ms: 5000,
        }
    }
}

/// A [`SwimConfig`] that cannot be used, or a member list that does not fit it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwimConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    ZeroCount(&'static str),
    /// The direct probe wait leaves no time for indirect probes.
    #[error("probe_rtt_ms ({rtt_ms}) must be less than probe_period_ms ({period_ms})")]
    ProbeRttNotBelowPeriod {
        /// The configured `probe_rtt_ms`.
        rtt_ms: u64,
        /// The configured `probe_period_ms`.
        period_ms: u64,
    },
    /// `max_packet_size` outside [`MIN_PACKET_SIZE`]..=[`MAX_PACKET_SIZE_LIMIT`].
    #[error("max_packet_size ({0}) must be between {MIN_PACKET_SIZE} and {MAX_PACKET_SIZE_LIMIT}")]
    PacketSize(usize),
    /// This node's own id is not in the member list.
    #[error("this node ({0}) is not in the member list")]
    SelfNotAMember(ShortId),
}

impl SwimConfig {
    /// Checks every field; the error names the offending key.
    pub fn validate(&self) -> Result<(), SwimConfigError> {
        for (key, value) in [
            ("probe_period_ms", self.probe_period_ms),
            ("probe_rtt_ms", self.probe_rtt_ms),
            ("suspect_to_down_ms", self.suspect_to_down_ms),
            (
                "isolated_announce_interval_ms",
                self.isolated_announce_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err(SwimConfigError::ZeroDuration(key));
            }
        }
        if self.probe_rtt_ms >= self.probe_period_ms {
            return Err(SwimConfigError::ProbeRttNotBelowPeriod {
                rtt_ms: self.probe_rtt_ms,
                period_ms: self.probe_period_ms,
            });
        }
        if self.num_indirect_probes == 0 {
            return Err(SwimConfigError::ZeroCount("num_indirect_probes"));
        }
        if self.max_transmissions == 0 {
            return Err(SwimConfigError::ZeroCount("max_transmissions"));
        }
        if self.gossip_interval_ms > 0 && self.gossip_fanout == 0 {
            return Err(SwimConfigError::ZeroCount("gossip_fanout"));
        }
        if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE_LIMIT).contains(&self.max_packet_size) {
            return Err(SwimConfigError::PacketSize(self.max_packet_size));
        }
        Ok(())
    }

    /// The foca configuration. Call only after [`Self::validate`] succeeded.
    fn to_foca(&self) -> foca::Config {
        let periodic = |interval_ms: u64, members: usize| {
            (interval_ms > 0).then(|| PeriodicParams {
                frequency: Duration::from_millis(interval_ms),
                num_members: NonZeroUsize::new(members).unwrap_or(NonZeroUsize::MIN),
            })
        };
        let mut config = foca::Config::simple();
        config.probe_period = Duration::from_millis(self.probe_period_ms);
        config.probe_rtt = Duration::from_millis(self.probe_rtt_ms);
        config.num_indirect_probes =
            NonZeroUsize::new(self.num_indirect_probes).unwrap_or(NonZeroUsize::MIN);
        config.max_transmissions = NonZeroU8::new(self.max_transmissions).unwrap_or(NonZeroU8::MIN);
        config.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_ms);
        // The member list is static and small, so down members are never forgotten: this keeps
        // stale generations of a member from being accepted again.
        config.remove_down_after = None;
        config.max_packet_size =
            NonZeroUsize::new(self.max_packet_size).unwrap_or(NonZeroUsize::MIN);
        // Tell a member we believe down that it is, so it renews its generation and rejoins.
        config.notify_down_members = true;
        config.periodic_announce = periodic(self.announce_interval_ms, 1);
        config.periodic_announce_to_down_members = periodic(self.down_announce_interval_ms, 2);
        config.periodic_gossip = periodic(self.gossip_interval_ms, self.gossip_fanout);
        config
    }
}

/// Why a received datagram was dropped. Every variant is also counted in [`SwimCounters`].
#[derive(Debug, thiserror::Error)]
pub enum SwimError {
    /// The sender, or an identity named in the datagram's header, is not a configured member.
    #[error("identity {0} is not a mesh member")]
    NotAMember(ShortId),
    /// The datagram claims to come from another member than the one the mesh socket
    /// authenticated.
    #[error("datagram from {from} claims to come from {claimed}")]
    SenderMismatch {
        /// The authenticated sender.
        from: ShortId,
        /// The sender named inside the datagram.
        claimed: ShortId,
    },
    /// Larger than [`SwimConfig::max_packet_size`].
    #[error("datagram of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The datagram's length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The bytes are not a SWIM datagram.
    #[error("malformed swim datagram: {0}")]
    Decode(#[from] postcard::Error),
    /// foca refused a well-formed datagram (trailing bytes, a message about ourselves that
    /// should not reach us, data claiming to be from us).
    #[error("swim datagram rejected: {0}")]
    Rejected(#[source] foca::Error),
}

/// A change in a member's liveness, as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum MemberEvent {
    /// The member is alive (first contact, or back after being down or restarting).
    Up(ShortId),
    /// The mesh declared the member down: it failed direct and indirect probes and did not
    /// refute the suspicion in time.
    Down(ShortId),
}

/// A member's liveness state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe cycle; declared down unless it refutes in time. Still counted as alive
    /// by [`Swim::is_alive`].
    Suspect,
    /// Declared down, or never heard from.
    Down,
}

/// One member as this node sees it, for operators and the status page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberView {
    /// The member's short id, in hex.
    pub id: String,
    /// Alive, suspect or down.
    pub state: MemberState,
    /// The member's SWIM incarnation: it increases each time it refutes a suspicion.
    pub incarnation: u16,
    /// The member's generation: it increases each time it comes back after being down.
    pub generation: u16,
    /// When this node last saw the state change (or when this node started).
    pub since: Timestamp,
}

/// Counts of notable events, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwimCounters {
    /// Datagrams passed to [`Swim::handle_datagram`].
    pub datagrams_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Datagrams handed out by [`Swim::poll_transmit`].
    pub datagrams_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Datagrams dropped because the sender or an identity in their header is not a member.
    pub ignored_non_member: u64,
    /// Piggybacked updates about non-members, stripped from otherwise valid datagrams.
    pub ignored_non_member_updates: u64,
    /// Datagrams that did not decode, or were too large.
    pub decode_errors: u64,
    /// Datagrams naming another sender than the authenticated one.
    pub sender_mismatch: u64,
    /// Well-formed datagrams foca refused.
    pub rejected: u64,
    /// Times this node renewed its generation to come back after being declared down.
    pub rejoins: u64,
    /// Errors foca reported while handling timers or announcing; they indicate a bug.
    pub internal_errors: u64,
}

/// A member's identity on the wire: the member plus a generation that lets it rejoin after
/// being declared down. Only `id` names the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct MemberId {
    id: ShortId,
    generation: u16,
}

impl foca::Identity for MemberId {
    type Addr = ShortId;

    fn renew(&self) -> Option<Self> {
        let generation = self.generation.checked_add(1)?;
        Some(MemberId {
            id: self.id,
            generation,
        })
    }

    fn addr(&self) -> ShortId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// foca 2 draws from a rand 0.10 generator; the workspace is on rand 0.9. This forwards.
struct FocaRng(StdRng);

impl foca_rand_core::TryRng for FocaRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

/// What foca asked for during one call: collected here, then turned into transmits, events and
/// absolute timer deadlines.
#[derive(Default)]
struct Outbox {
    /// The time of the call in progress: timers are due `now + after`.
    now: Timestamp,
    /// Pending foca timers by deadline; the sequence number keeps equal deadlines in order.
    timers: BTreeMap<(Timestamp, u64), Timer<MemberId>>,
    next_timer_seq: u64,
    sends: Vec<(MemberId, Vec<u8>)>,
    notifications: Vec<OwnedNotification<MemberId>>,
}

impl Runtime<MemberId> for Outbox {
    fn notify(&mut self, notification: Notification<'_, MemberId>) {
        self.notifications.push(notification.to_owned());
    }

    fn send_to(&mut self, to: MemberId, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<MemberId>, after: Duration) {
        let seq = self.next_timer_seq;
        self.next_timer_seq += 1;
        self.timers.insert((self.now + after, seq), event);
    }
}

/// What this node last saw of a peer.
#[derive(Clone, Copy, Debug)]
struct PeerView {
    state: MemberState,
    incarnation: u16,
    generation: u16,
    since: Timestamp,
}

/// The SWIM membership state machine one node runs. See the module docs for how to drive it.
pub struct Swim {
    me: ShortId,
    /// Every configured member, this node included.
    members: BTreeSet<ShortId>,
    config: SwimConfig,
    foca: Foca<MemberId, PostcardCodec, FocaRng, NoCustomBroadcast>,
    outbox: Outbox,
    transmits: VecDeque<(ShortId, Vec<u8>)>,
    events: VecDeque<MemberEvent>,
    /// Peers reported [`MemberEvent::Up`] and not since reported down.
    up: BTreeSet<ShortId>,
    peers: BTreeMap<ShortId, PeerView>,
    /// Our incarnation as last sent (foca does not expose it).
    own_incarnation: u16,
    /// When our own generation last changed (or we started).
    own_since: Timestamp,
    /// Set when foca gave up on our identity (generations exhausted).
    defunct: bool,
    /// Next time to check whether we are isolated; `None` until [`Swim::join`].
    next_isolated_check: Option<Timestamp>,
    counters: SwimCounters,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .field("up", &self.up.len())
            .finish_non_exhaustive()
    }
}

impl Swim {
    /// Creates the state machine for node `me`. `members` is every configured member id (this
    /// node included); datagrams and updates naming any other identity are ignored and counted.
    pub fn new(
        me: ShortId,
        members: impl IntoIterator<Item = ShortId>,
        config: SwimConfig,
        rng: StdRng,
        now: Timestamp,
    ) -> Result<Self, SwimConfigError> {
        config.validate()?;
        let members: BTreeSet<ShortId> = members.into_iter().collect();
        if !members.contains(&me) {
            return Err(SwimConfigError::SelfNotAMember(me));
        }
        let peers = members
            .iter()
            .filter(|id| **id != me)
            .map(|id| {
                let view = PeerView {
                    state: MemberState::Down,
                    incarnation: 0,
                    generation: 0,
                    since: now,
                };
                (*id, view)
            })
            .collect();
        let identity = MemberId {
            id: me,
            generation: 0,
        };
        let foca = Foca::new(identity, config.to_foca(), FocaRng(rng), PostcardCodec);
        Ok(Self {
            me,
            members,
            config,
            foca,
            outbox: Outbox {
                now,
                ..Outbox::default()
            },
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            up: BTreeSet::new(),
            peers,
            own_incarnation: 0,
            own_since: now,
            defunct: false,
            next_isolated_check: None,
            counters: SwimCounters::default(),
        })
    }

    /// Starts talking to the mesh: announces this node to every other member. Those that are
    /// up add it and answer with their view. Repeated every
    /// [`SwimConfig::isolated_announce_interval_ms`] for as long as no member is known alive.
    pub fn join(&mut self, now: Timestamp) {
        self.outbox.now = now;
        self.announce_to_all();
        self.next_isolated_check =
            Some(now + Duration::from_millis(self.config.isolated_announce_interval_ms));
        self.process(now);
    }

    /// Replaces the configured member list (a reload): added members are announced to at
    /// once, removed ones are forgotten — declared down here, without telling the others,
    /// who apply their own config — and reported [`MemberEvent::Down`] if they were up. This
    /// node must stay a member.
    pub fn set_members(
        &mut self,
        now: Timestamp,
        members: impl IntoIterator<Item = ShortId>,
    ) -> Result<(), SwimConfigError> {
        let members: BTreeSet<ShortId> = members.into_iter().collect();
        if !members.contains(&self.me) {
            return Err(SwimConfigError::SelfNotAMember(self.me));
        }
        self.outbox.now = now;
        let removed: Vec<ShortId> = self.members.difference(&members).copied().collect();
        let added: Vec<ShortId> = members.difference(&self.members).copied().collect();
        self.members = members;
        let gone: Vec<foca::Member<MemberId>> = self
            .foca
            .iter_membership_state()
            .filter(|m| removed.contains(&m.id().id))
            .map(|m| foca::Member::new(*m.id(), m.incarnation(), foca::State::Down))
            .collect();
        if let Err(err) = self
            .foca
            .apply_many(gone.into_iter(), false, &mut self.outbox)
        {
            self.internal_error("forget", &err);
        }
        for id in &removed {
            self.peers.remove(id);
            if self.up.remove(id) {
                self.events.push_back(MemberEvent::Down(*id));
            }
        }
        for id in &added {
            self.peers.insert(
                *id,
                PeerView {
                    state: MemberState::Down,
                    incarnation: 0,
                    generation: 0,
                    since: now,
                },
            );
            let dst = MemberId {
                id: *id,
                generation: 0,
            };
            if let Err(err) = self.foca.announce(dst, &mut self.outbox) {
                self.internal_error("announce", &err);
            }
        }
        self.process(now);
        Ok(())
    }

    /// Handles one SWIM datagram from member `from`, already authenticated by the mesh socket.
    ///
    /// An error means the datagram was dropped (and counted); the state machine is unharmed.
    pub fn handle_datagram(
        &mut self,
        now: Timestamp,
        from: ShortId,
        bytes: &[u8],
    ) -> Result<(), SwimError> {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += bytes.len() as u64;
        let result = self.handle_datagram_inner(now, from, bytes);
        if let Err(err) = &result {
            match err {
                SwimError::NotAMember(_) => self.counters.ignored_non_member += 1,
                SwimError::SenderMismatch { .. } => self.counters.sender_mismatch += 1,
                SwimError::TooLarge { .. } | SwimError::Decode(_) => {
                    self.counters.decode_errors += 1;
                }
                SwimError::Rejected(foca::Error::Decode(_) | foca::Error::MalformedPacket) => {
                    self.counters.decode_errors += 1;
                }
                SwimError::Rejected(_) => self.counters.rejected += 1,
            }
            tracing::debug!(peer = %from, error = %err, "swim datagram dropped");
        }
        result
    }

    fn handle_datagram_inner(
        &mut self,
        now: Timestamp,
        from: ShortId,
        bytes: &[u8],
    ) -> Result<(), SwimError> {
        if !self.members.contains(&from) {
            return Err(SwimError::NotAMember(from));
        }
        let max = self.config.max_packet_size;
        if bytes.len() > max {
            return Err(SwimError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let screened = self.screen(from, bytes)?;
        self.outbox.now = now;
        let current = *self.foca.identity();
        if let Some(seen) = screened.own_generation
            && seen > current.generation
            && let Some(next) = seen.checked_add(1)
        {
            // We restarted and the mesh still knows a later generation of us: jump past it,
            // instead of renewing one generation per round trip.
            let renewed = MemberId {
                id: self.me,
                generation: next,
            };
            if let Err(err) = self.foca.change_identity(renewed, &mut self.outbox) {
                self.internal_error("change_identity", &err);
            } else {
                self.counters.rejoins += 1;
                self.own_since = now;
                tracing::info!(generation = next, "swim: resuming after a restart");
                self.announce_to_all();
            }
        }
        let data = screened.rewritten.as_deref().unwrap_or(bytes);
        let result = self.foca.handle_data(data, &mut self.outbox);
        self.process(now);
        result.map_err(SwimError::Rejected)
    }

    /// Decodes the header and updates of a datagram to check every identity in it: a header
    /// naming a non-member drops the datagram; updates about non-members are stripped (a
    /// member whose list is ahead of ours, during a config roll-out, must not get all its
    /// datagrams dropped).
    fn screen(&mut self, from: ShortId, bytes: &[u8]) -> Result<Screened, SwimError> {
        let (header, rest) = postcard::take_from_bytes::<Header<MemberId>>(bytes)?;
        if header.src.id != from {
            return Err(SwimError::SenderMismatch {
                from,
                claimed: header.src.id,
            });
        }
        let named = match &header.message {
            Message::PingReq { target, .. } | Message::IndirectAck { target, .. } => Some(target),
            Message::IndirectPing { origin, .. } | Message::ForwardedAck { origin, .. } => {
                Some(origin)
            }
            _ => None,
        };
        for id in [Some(&header.src), Some(&header.dst), named]
            .into_iter()
            .flatten()
        {
            if !self.members.contains(&id.id) {
                return Err(SwimError::NotAMember(id.id));
            }
        }
        let mut own_generation = (header.dst.id == self.me).then_some(header.dst.generation);

        // foca's layout after the header: a big-endian u16 count, then that many updates.
        // Announce carries none, and foca itself rejects a lone trailing byte.
        let carries_updates = !matches!(header.message, Message::Announce | Message::Broadcast);
        let mut rewritten = None;
        if carries_updates && rest.len() >= 2 {
            let count = u16::from_be_bytes([rest[0], rest[1]]);
            let updates_start = bytes.len() - rest.len() + 2;
            let mut cursor = &rest[2..];
            // The count is untrusted: every update takes more than one byte.
            let mut kept: Vec<std::ops::Range<usize>> =
                Vec::with_capacity(usize::from(count).min(cursor.len()));
            let mut stripped = 0u64;
            for _ in 0..count {
                let start = bytes.len() - cursor.len();
                let (member, after) = postcard::take_from_bytes::<Member<MemberId>>(cursor)?;
                let end = bytes.len() - after.len();
                let id = member.id().id;
                if id == self.me {
                    own_generation = own_generation.max(Some(member.id().generation));
                }
                if self.members.contains(&id) {
                    kept.push(start..end);
                } else {
                    stripped += 1;
                }
                cursor = after;
            }
            if stripped > 0 {
                self.counters.ignored_non_member_updates += stripped;
                let mut out = Vec::with_capacity(bytes.len());
                out.extend_from_slice(&bytes[..updates_start - 2]);
                // `kept` is at most `count` long, so it fits.
                out.extend_from_slice(&(kept.len() as u16).to_be_bytes());
                for range in kept {
                    out.extend_from_slice(&bytes[range]);
                }
                out.extend_from_slice(cursor);
                rewritten = Some(out);
            }
        }
        Ok(Screened {
            rewritten,
            own_generation,
        })
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.outbox.now = now;
        loop {
            let mut due = Vec::new();
            while let Some(entry) = self.outbox.timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if due.is_empty() {
                break;
            }
            // When several timers are due at once (a late call), foca wants them in its own
            // order: the indirect probe before the next probe, and so on. The sort is stable.
            due.sort();
            for timer in due {
                if let Err(err) = self.foca.handle_timer(timer, &mut self.outbox) {
                    self.internal_error("timer", &err);
                }
            }
        }
        if let Some(at) = self.next_isolated_check
            && at <= now
        {
            if self.foca.num_members() == 0 {
                self.announce_to_all();
            }
            self.next_isolated_check =
                Some(now + Duration::from_millis(self.config.isolated_announce_interval_ms));
        }
        self.process(now);
    }

    /// When [`Swim::handle_timeout`] should next be called, if anything is scheduled.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let foca = self.outbox.timers.keys().next().map(|(at, _)| *at);
        match (foca, self.next_isolated_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next datagram to send, and the member to send it to.
    pub fn poll_transmit(&mut self) -> Option<(ShortId, Vec<u8>)> {
        let (to, bytes) = self.transmits.pop_front()?;
        self.counters.datagrams_out += 1;
        self.counters.bytes_out += bytes.len() as u64;
        Some((to, bytes))
    }

    /// The next liveness change.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Every configured member (this node included) as this node sees it, ordered by id.
    pub fn members(&self) -> Vec<MemberView> {
        let own = MemberView {
            id: self.me.to_string(),
            state: if self.defunct {
                MemberState::Down
            } else {
                MemberState::Alive
            },
            incarnation: self.own_incarnation,
            generation: self.foca.identity().generation,
            since: self.own_since,
        };
        let mut out: Vec<MemberView> = self
            .peers
            .iter()
            .map(|(id, view)| MemberView {
                id: id.to_string(),
                state: view.state,
                incarnation: view.incarnation,
                generation: view.generation,
                since: view.since,
            })
            .collect();
        let at = out.partition_point(|view| view.id < own.id);
        out.insert(at, own);
        out
    }

    /// Whether `id` is alive or suspect; true for this node itself.
    pub fn is_alive(&self, id: &ShortId) -> bool {
        *id == self.me || self.up.contains(id)
    }

    /// Counts of notable events, for metrics.
    pub fn counters(&self) -> &SwimCounters {
        &self.counters
    }

    fn announce_to_all(&mut self) {
        let peers: Vec<ShortId> = self.peers.keys().copied().collect();
        for id in peers {
            // An Announce is accepted by whatever generation the member is at.
            let dst = MemberId { id, generation: 0 };
            if let Err(err) = self.foca.announce(dst, &mut self.outbox) {
                self.internal_error("announce", &err);
            }
        }
    }

    fn internal_error(&mut self, what: &'static str, err: &foca::Error) {
        self.counters.internal_errors += 1;
        tracing::warn!(error = %err, "swim: foca failed in {what}");
    }

    /// Turns what foca asked for into transmits and events, and refreshes the view.
    fn process(&mut self, now: Timestamp) {
        let mut rejoined = false;
        for notification in std::mem::take(&mut self.outbox.notifications) {
            match notification {
                OwnedNotification::MemberUp(member)
                    if member.id != self.me && self.up.insert(member.id) =>
                {
                    tracing::info!(peer = %member.id, "swim: member up");
                    self.events.push_back(MemberEvent::Up(member.id));
                }
                OwnedNotification::MemberDown(member) if self.up.remove(&member.id) => {
                    tracing::info!(peer = %member.id, "swim: member down");
                    self.events.push_back(MemberEvent::Down(member.id));
                }
                OwnedNotification::Rejoin(identity) => {
                    self.counters.rejoins += 1;
                    self.own_since = now;
                    rejoined = true;
                    tracing::info!(
                        generation = identity.generation,
                        "swim: the mesh declared us down; rejoining"
                    );
                }
                OwnedNotification::Defunct => {
                    self.defunct = true;
                    self.own_since = now;
                    tracing::warn!("swim: declared down and out of generations");
                }
                OwnedNotification::Active => self.defunct = false,
                _ => {}
            }
        }
        if rejoined {
            // foca only gossips the new generation to a few members, and the messages that
            // told us we were down were not for the new generation, so we may know hardly
            // anyone: announce to everyone to get their views back.
            self.announce_to_all();
        }
        for (to, bytes) in std::mem::take(&mut self.outbox.sends) {
            if to.id == self.me || !self.members.contains(&to.id) {
                // Unreachable: foca only learns identities that passed `screen`.
                continue;
            }
            if let Ok((header, _)) = postcard::take_from_bytes::<Header<MemberId>>(&bytes) {
                self.own_incarnation = header.src_incarnation;
            }
            self.transmits.push_back((to.id, bytes));
        }
        for member in self.foca.iter_membership_state() {
            let id = member.id();
            let Some(view) = self.peers.get_mut(&id.id) else {
                // Our own past generations, which foca keeps as down.
                continue;
            };
            // foca keeps one entry per member, except briefly while a newer generation
            // replaces an older one: the newer generation is the member.
            if id.generation < view.generation {
                continue;
            }
            let state = match member.state() {
                State::Alive => MemberState::Alive,
                State::Suspect => MemberState::Suspect,
                State::Down => MemberState::Down,
            };
            if state != view.state {
                view.since = now;
            }
            view.state = state;
            view.incarnation = member.incarnation();
            view.generation = id.generation;
        }
    }
}

/// What [`Swim::screen`] found in an acceptable datagram.
struct Screened {
    /// The datagram without updates about non-members, when there were any.
    rewritten: Option<Vec<u8>>,
    /// The highest generation of this node the datagram mentions.
    own_generation: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn short(i: usize) -> ShortId {
        ShortId((i as u64 + 1).to_be_bytes())
    }

    /// A datagram in flight.
    type InFlight = Reverse<(Timestamp, u64, usize, usize, Vec<u8>)>;

    /// A virtual-time network of [`Swim`] nodes with per-pair one-way latency, optional loss,
    /// blocked pairs, and crash/restart.
    struct Net {
        now: Timestamp,
        seed: u64,
        ids: Vec<ShortId>,
        index: BTreeMap<ShortId, usize>,
        nodes: Vec<Option<Swim>>,
        latency: Vec<Vec<Duration>>,
        loss: f64,
        blocked: BTreeSet<(usize, usize)>,
        queue: BinaryHeap<InFlight>,
        seq: u64,
        rng: StdRng,
        /// (when, observer, event)
        events: Vec<(Timestamp, usize, MemberEvent)>,
        bytes_sent: Vec<u64>,
        restarts: u64,
        /// Datagrams a node refused.
        errors: Vec<String>,
    }

    impl Net {
        fn new(n: usize, seed: u64, min_ms: u64, max_ms: u64) -> Self {
            println!("seed {seed}");
            let mut rng = StdRng::seed_from_u64(seed);
            let mut latency = vec![vec![Duration::ZERO; n]; n];
            for (a, b) in (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))) {
                let one_way = Duration::from_millis(rng.random_range(min_ms..=max_ms));
                latency[a][b] = one_way;
                latency[b][a] = one_way;
            }
            let ids: Vec<ShortId> = (0..n).map(short).collect();
            let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            let mut net = Net {
                now: Timestamp::ZERO,
                seed,
                ids,
                index,
                nodes: (0..n).map(|_| None).collect(),
                latency,
                loss: 0.0,
                blocked: BTreeSet::new(),
                queue: BinaryHeap::new(),
                seq: 0,
                rng,
                events: Vec::new(),
                bytes_sent: vec![0; n],
                restarts: 0,
                errors: Vec::new(),
            };
            for i in 0..n {
                net.start(i);
            }
            net
        }

        fn start(&mut self, i: usize) {
            let node_seed = self.seed ^ ((i as u64) << 32) ^ (self.restarts << 48);
            self.restarts += 1;
            let mut node = Swim::new(
                self.ids[i],
                self.ids.iter().copied(),
                SwimConfig::default(),
                StdRng::seed_from_u64(node_seed),
                self.now,
            )
            .expect("valid config");
            node.join(self.now);
            self.nodes[i] = Some(node);
            self.flush(i);
        }

        fn crash(&mut self, i: usize) {
            self.nodes[i] = None;
        }

        fn block(&mut self, a: usize, b: usize) {
            self.blocked.insert((a.min(b), a.max(b)));
        }

        fn flush(&mut self, i: usize) {
            let Some(node) = self.nodes[i].as_mut() else {
                return;
            };
            let mut out = Vec::new();
            while let Some(t) = node.poll_transmit() {
                out.push(t);
            }
            while let Some(ev) = node.poll_event() {
                self.events.push((self.now, i, ev));
            }
            for (to, bytes) in out {
                self.bytes_sent[i] += bytes.len() as u64;
                let j = self.index[&to];
                if self.blocked.contains(&(i.min(j), i.max(j))) {
                    continue;
                }
                if self.loss > 0.0 && self.rng.random_bool(self.loss) {
                    continue;
                }
                let at = self.now + self.latency[i][j];
                self.seq += 1;
                self.queue.push(Reverse((at, self.seq, i, j, bytes)));
            }
        }

        fn next_time(&self) -> Option<Timestamp> {
            let packet = self.queue.peek().map(|Reverse((at, ..))| *at);
            let timer = self
                .nodes
                .iter()
                .flatten()
                .filter_map(|n| n.poll_timeout())
                .min();
            match (packet, timer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }

        fn run_until(&mut self, until: Timestamp) {
            while let Some(next) = self.next_time() {
                if next > until {
                    break;
                }
                self.now = next;
                while self
                    .queue
                    .peek()
                    .is_some_and(|Reverse((at, ..))| *at <= self.now)
                {
                    let Some(Reverse((_, _, from, to, bytes))) = self.queue.pop() else {
                        break;
                    };
                    if let Some(node) = self.nodes[to].as_mut() {
                        if let Err(err) = node.handle_datagram(self.now, self.ids[from], &bytes) {
                            self.errors.push(format!("{from} -> {to}: {err}"));
                        }
                        self.flush(to);
                    }
                }
                for i in 0..self.nodes.len() {
                    let due = self.nodes[i]
                        .as_ref()
                        .and_then(|n| n.poll_timeout())
                        .is_some_and(|at| at <= self.now);
                    if due {
                        if let Some(node) = self.nodes[i].as_mut() {
                            node.handle_timeout(self.now);
                        }
                        self.flush(i);
                    }
                }
            }
            self.now = until;
        }

        /// Runs in steps of `step` until `done` holds, or `limit` passes; returns the time.
        fn run_until_true(
            &mut self,
            limit: Timestamp,
            mut done: impl FnMut(&Net) -> bool,
        ) -> Option<Timestamp> {
            let step = Duration::from_millis(50);
            while self.now < limit {
                if done(self) {
                    return Some(self.now);
                }
                let next = self.now + step;
                self.run_until(next);
            }
            done(self).then_some(self.now)
        }

        fn live(&self) -> impl Iterator<Item = (usize, &Swim)> {
            self.nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
        }

        fn all_see_all(&self) -> bool {
            self.live()
                .all(|(_, node)| self.live().all(|(j, _)| node.is_alive(&self.ids[j])))
        }

        fn downs(&self) -> Vec<(Timestamp, usize, ShortId)> {
            self.events
                .iter()
                .filter_map(|(at, i, ev)| match ev {
                    MemberEvent::Down(id) => Some((*at, *i, *id)),
                    MemberEvent::Up(_) => None,
                })
                .collect()
        }
    }

    fn secs(s: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_secs(s))
    }

    /// A reload adds a member everyone then sees alive, and removes one that the node that
    /// dropped it reports down and stops seeing.
    #[test]
    fn members_added_and_removed_by_a_reload() {
        let mut net = Net::new(4, 31, 5, 30);
        let three: Vec<ShortId> = net.ids[..3].to_vec();
        // Nodes 0–2 start without node 3 in their list.
        for i in 0..3 {
            if let Some(node) = net.nodes[i].as_mut() {
                node.set_members(net.now, three.iter().copied())
                    .expect("still a member");
            }
            net.flush(i);
        }
        net.run_until(secs(10));
        for i in 0..3 {
            let node = net.nodes[i].as_ref().expect("up");
            assert!(!node.is_alive(&net.ids[3]), "node {i} sees a non-member");
        }
        // The reload adds it.
        let now = net.now;
        for i in 0..3 {
            if let Some(node) = net.nodes[i].as_mut() {
                node.set_members(now, net.ids.iter().copied())
                    .expect("still a member");
            }
            net.flush(i);
        }
        let seen = net.run_until_true(secs(20), Net::all_see_all);
        assert!(seen.is_some(), "the added member is not seen by all");
        // Node 0 drops node 2: it reports it down at once and never sees it again.
        let keep: Vec<ShortId> = net
            .ids
            .iter()
            .copied()
            .filter(|id| *id != net.ids[2])
            .collect();
        let now = net.now;
        if let Some(node) = net.nodes[0].as_mut() {
            node.set_members(now, keep.iter().copied())
                .expect("still a member");
            assert!(
                node.set_members(now, [net.ids[1]]).is_err(),
                "a list without the node itself is refused"
            );
        }
        net.flush(0);
        assert!(
            net.downs()
                .iter()
                .any(|(_, i, id)| *i == 0 && *id == net.ids[2])
        );
        net.run_until(secs(40));
        let node = net.nodes[0].as_ref().expect("up");
        assert!(!node.is_alive(&net.ids[2]));
        assert!(
            node.members()
                .iter()
                .all(|m| m.id != net.ids[2].to_string())
        );
        assert!(node.is_alive(&net.ids[3]) && node.is_alive(&net.ids[1]));
    }

    #[test]
    fn swim_config_defaults_are_valid_and_bad_ones_name_the_key() {
        assert_eq!(SwimConfig::default().validate(), Ok(()));
        let bad = SwimConfig {
            probe_rtt_ms: 1500,
            ..SwimConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SwimConfigError::ProbeRttNotBelowPeriod { .. })
        ));
        let bad = SwimConfig {
            max_packet_size: 1400,
            ..SwimConfig::default()
        };
        assert_eq!(bad.validate(), Err(SwimConfigError::PacketSize(1400)));
        let bad = SwimConfig {
            suspect_to_down_ms: 0,
            ..SwimConfig::default()
        };
        let err = bad.validate().expect_err("zero suspicion");
        assert!(err.to_string().contains("suspect_to_down_ms"), "{err}");
        let parsed: SwimConfig = toml::from_str("probe_period_ms = 2000").expect("toml");
        assert_eq!(parsed.probe_period_ms, 2000);
        assert_eq!(parsed.probe_rtt_ms, 500);
        assert!(toml::from_str::<SwimConfig>("probe_period = 2").is_err());
        let not_member = Swim::new(
            short(9),
            [short(0), short(1)],
            SwimConfig::default(),
            StdRng::seed_from_u64(1),
            Timestamp::ZERO,
        );
        assert!(matches!(
            not_member,
            Err(SwimConfigError::SelfNotAMember(_))
        ));
    }

    /// 1. Ten nodes with 20–150 ms one-way latency all see each other up quickly.
    #[test]
    fn swim_ten_nodes_converge() {
        let mut net = Net::new(10, 0x5717_0001, 20, 150);
        let at = net
            .run_until_true(secs(10), Net::all_see_all)
            .expect("all nodes see all others up within 10 s");
        println!("10 nodes: everyone sees everyone up after {at:?}");
        assert!(at <= secs(3), "converged only after {at:?}");
        for (i, node) in net.live() {
            let ups = net
                .events
                .iter()
                .filter(|(_, o, ev)| *o == i && matches!(ev, MemberEvent::Up(_)))
                .count();
            assert_eq!(ups, 9, "node {i} reported {ups} members up");
            assert_eq!(node.members().len(), 10);
            assert!(node.members().iter().all(|m| m.state == MemberState::Alive));
        }
        net.run_until(secs(60));
        assert!(net.downs().is_empty(), "false positives: {:?}", net.downs());
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    /// Crashes node `victim` at `at`, runs until every other node reported it down, and
    /// returns the detection times (crash to each node's Down event).
    fn crash_and_detect(net: &mut Net, victim: usize, at: Timestamp) -> Vec<Duration> {
        net.run_until(at);
        assert!(net.all_see_all(), "mesh not converged before the crash");
        net.crash(victim);
        let id = net.ids[victim];
        let n = net.nodes.len();
        net.run_until_true(at + Duration::from_secs(30), |net| {
            net.live().all(|(_, node)| !node.is_alive(&id))
        })
        .expect("crash detected within 30 s");
        let mut times: Vec<Duration> = net
            .downs()
            .into_iter()
            .filter(|(_, _, who)| *who == id)
            .map(|(when, _, _)| when.saturating_since(at))
            .collect();
        assert_eq!(times.len(), n - 1, "every other node reports it down once");
        times.sort();
        let others: Vec<_> = net
            .downs()
            .into_iter()
            .filter(|(_, _, who)| *who != id)
            .collect();
        assert!(others.is_empty(), "false positives: {others:?}");
        assert!(net.errors.is_empty(), "{:?}", net.errors);
        times
    }

    /// 2. A crashed node is reported down by every other node. Twenty seeded trials (ten
    ///    nodes, 20–150 ms one-way, crash at varying times) measure the crash-to-Down time at
    ///    each node.
    ///
    ///    Bounds from the config (period T = 1.5 s, suspicion S = 3 s): every node probes each
    ///    member once per round of N − 1 periods, so someone probes the victim within
    ///    (N − 1)·T; the probe is judged failed one period later; S later it is declared down;
    ///    gossip takes well under a second. Hard bound: N·T + S + 1 s = 19 s. Typically the
    ///    first of the N − 1 probers reaches it after about T, hence about 2T + S ≈ 6 s: the
    ///    median must stay under 2T + S + 1.5 s = 7.5 s.
    #[test]
    fn swim_crash_is_detected_by_everyone() {
        let config = SwimConfig::default();
        let n = 10usize;
        let period = Duration::from_millis(config.probe_period_ms);
        let suspicion = Duration::from_millis(config.suspect_to_down_ms);
        let hard_bound = period * n as u32 + suspicion + Duration::from_secs(1);
        let typical_bound = period * 2 + suspicion + Duration::from_millis(1500);
        let mut slowest = Vec::new();
        let mut fastest = Vec::new();
        for trial in 0..20u64 {
            let mut net = Net::new(n, 0x5717_0200 + trial, 20, 150);
            let victim = (trial as usize * 3) % n;
            let at = secs(20) + Duration::from_millis(trial * 617);
            let times = crash_and_detect(&mut net, victim, at);
            fastest.push(times[0]);
            slowest.push(times[times.len() - 1]);
            let observer = (victim + 1) % n;
            let view = net.nodes[observer]
                .as_ref()
                .map(|n| n.members())
                .unwrap_or_default();
            let id = net.ids[victim].to_string();
            assert!(
                view.iter()
                    .any(|m| m.id == id && m.state == MemberState::Down)
            );
        }
        slowest.sort();
        fastest.sort();
        let median = slowest[slowest.len() / 2];
        let p90 = slowest[slowest.len() * 9 / 10];
        let max = slowest[slowest.len() - 1];
        println!(
            "crash detection, N={n}, 20 trials, time until the last node reports Down: \
             median {median:?}, p90 {p90:?}, max {max:?} (first node: median {:?})",
            fastest[fastest.len() / 2]
        );
        assert!(
            max < hard_bound,
            "slowest detection {max:?} >= {hard_bound:?}"
        );
        assert!(
            median < typical_bound,
            "median detection {median:?} >= {typical_bound:?}"
        );
    }

    /// 3. A crashed node that restarts (fresh state, same id) is reported up again.
    #[test]
    fn swim_restarted_node_is_accepted_back() {
        let mut net = Net::new(10, 0x5717_0003, 20, 150);
        crash_and_detect(&mut net, 3, secs(20));
        let restart = net.now + Duration::from_secs(5);
        net.run_until(restart);
        net.start(3);
        let at = net
            .run_until_true(restart + Duration::from_secs(30), Net::all_see_all)
            .expect("restarted node accepted back within 30 s");
        let took = at.saturating_since(restart);
        println!("restarted node seen up by all after {took:?}");
        // It announces to everyone, learns it was declared down, renews and announces again:
        // a few round trips.
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let id = net.ids[3];
        for (i, _) in net.live().filter(|(i, _)| *i != 3) {
            let last = net
                .events
                .iter()
                .rev()
                .find(|(_, o, ev)| {
                    *o == i && matches!(ev, MemberEvent::Up(x) | MemberEvent::Down(x) if *x == id)
                })
                .map(|(_, _, ev)| *ev);
            assert_eq!(last, Some(MemberEvent::Up(id)), "node {i}");
        }
        // It stays up, with no one else going down.
        net.run_until(restart + Duration::from_secs(60));
        assert!(net.all_see_all());
        assert_eq!(net.downs().len(), 9, "only the crash: {:?}", net.downs());
        let gen_seen = net.nodes[0]
            .as_ref()
            .map(|n| n.members())
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.id == id.to_string())
            .map(|m| m.generation);
        assert!(gen_seen >= Some(1), "restart renewed the generation");

        // Crash it again and restart it before anyone notices: the mesh still knows its
        // previous generation alive, so the fresh node must jump past it.
        let crash = net.now;
        net.crash(3);
        net.run_until(crash + Duration::from_millis(300));
        net.start(3);
        let quick = net.now;
        let at = net
            .run_until_true(quick + Duration::from_secs(30), Net::all_see_all)
            .expect("quickly restarted node accepted within 30 s");
        let took = at.saturating_since(quick);
        println!("quick restart: seen up by all after {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        net.run_until(quick + Duration::from_secs(60));
        assert!(net.all_see_all());
        let others: Vec<_> = net
            .downs()
            .into_iter()
            .filter(|(_, _, who)| *who != id)
            .collect();
        assert!(others.is_empty(), "false positives: {others:?}");
        let restarted = net.nodes[3].as_ref().expect("node 3 runs");
        assert!(restarted.counters().rejoins >= 1);
        println!("datagrams refused around the restarts: {:?}", net.errors);
    }

    /// 4. Two nodes that cannot reach each other directly, but reach everyone else, are never
    ///    declared down: indirect probes vouch for them. Light random loss on top.
    #[test]
    fn swim_broken_direct_path_is_not_a_failure() {
        let mut net = Net::new(10, 0x5717_0004, 20, 150);
        net.block(0, 1);
        net.loss = 0.01;
        net.run_until(secs(300));
        assert!(net.all_see_all(), "someone is not seen alive");
        assert!(net.downs().is_empty(), "false positives: {:?}", net.downs());
        let zero = net.nodes[0].as_ref().expect("node 0 runs");
        assert!(zero.is_alive(&net.ids[1]));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    fn lone_node() -> Swim {
        let mut node = Swim::new(
            short(0),
            (0..3).map(short),
            SwimConfig::default(),
            StdRng::seed_from_u64(5),
            Timestamp::ZERO,
        )
        .expect("valid");
        node.join(Timestamp::ZERO);
        while node.poll_transmit().is_some() {}
        node
    }

    fn encode(header: &Header<MemberId>, updates: &[Member<MemberId>]) -> Vec<u8> {
        let mut out = postcard::to_allocvec(header).expect("encode header");
        if !updates.is_empty() {
            out.extend_from_slice(&(updates.len() as u16).to_be_bytes());
            for update in updates {
                out.extend(postcard::to_allocvec(update).expect("encode member"));
            }
        }
        out
    }

    fn mid(id: ShortId) -> MemberId {
        MemberId { id, generation: 0 }
    }

    /// 5. Non-member identities are ignored and counted; garbage is an error, never a panic.
    #[test]
    fn swim_non_members_and_garbage_are_counted_not_fatal() {
        let mut node = lone_node();
        let stranger = short(77);
        let now = Timestamp::from_millis(10);
        let announce = |src: ShortId| Header {
            src: mid(src),
            src_incarnation: 0,
            dst: mid(short(0)),
            message: Message::Announce,
        };

        // A datagram from a non-member.
        let err = node.handle_datagram(now, stranger, &encode(&announce(stranger), &[]));
        assert!(matches!(err, Err(SwimError::NotAMember(id)) if id == stranger));
        // A member relaying a header that claims another sender.
        let err = node.handle_datagram(now, short(1), &encode(&announce(stranger), &[]));
        assert!(matches!(err, Err(SwimError::SenderMismatch { .. })));
        // A member asking us to probe a non-member.
        let ping_req = Header {
            src: mid(short(1)),
            src_incarnation: 0,
            dst: mid(short(0)),
            message: Message::PingReq {
                target: mid(stranger),
                probe_number: 1,
            },
        };
        let err = node.handle_datagram(now, short(1), &encode(&ping_req, &[]));
        assert!(matches!(err, Err(SwimError::NotAMember(id)) if id == stranger));
        assert_eq!(node.counters().ignored_non_member, 2);
        assert_eq!(node.counters().sender_mismatch, 1);
        assert!(node.members().iter().all(|m| m.id != stranger.to_string()));

        // Gossip about a member and a non-member: the non-member is stripped, the rest applies.
        let gossip = Header {
            src: mid(short(1)),
            src_incarnation: 0,
            dst: mid(short(0)),
            message: Message::Gossip,
        };
        let updates = [Member::alive(mid(stranger)), Member::alive(mid(short(2)))];
        node.handle_datagram(now, short(1), &encode(&gossip, &updates))
            .expect("valid gossip");
        assert_eq!(node.counters().ignored_non_member_updates, 1);
        assert!(node.is_alive(&short(1)) && node.is_alive(&short(2)));
        assert!(!node.is_alive(&stranger));
        assert_eq!(node.members().len(), 3);
        let ups: Vec<_> = std::iter::from_fn(|| node.poll_event()).collect();
        assert_eq!(
            ups,
            vec![MemberEvent::Up(short(1)), MemberEvent::Up(short(2))]
        );

        // Garbage: empty, one byte, random bytes, every truncation of a valid datagram, and an
        // oversized one. All errors, none panics.
        let mut garbage_errors = 0u64;
        let mut rng = StdRng::seed_from_u64(0x6a7b);
        let valid = encode(&gossip, &updates);
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xff; 2000]];
        inputs.extend((1..valid.len()).map(|n| valid[..n].to_vec()));
        for _ in 0..5000 {
            let len = rng.random_range(0..200);
            inputs.push((0..len).map(|_| rng.random()).collect());
        }
        for bytes in &inputs {
            if let Err(err) = node.handle_datagram(now, short(1), bytes) {
                garbage_errors += 1;
                let _ = err.to_string();
            }
        }
        let c = node.counters();
        assert!(garbage_errors > 4000, "{garbage_errors} errors");
        assert!(c.decode_errors > 1000, "{c:?}");
        assert!(matches!(
            node.handle_datagram(now, short(1), &[]),
            Err(SwimError::Decode(_))
        ));
        assert!(matches!(
            node.handle_datagram(now, short(1), &vec![0u8; 2000]),
            Err(SwimError::TooLarge { .. })
        ));
        let json = serde_json::to_string(&node.members()).expect("json");
        assert!(json.contains("\"state\":\"alive\""), "{json}");
    }

    /// Steady-state bytes sent per node per second (SWIM payload only; the mesh frame adds its
    /// header and tag to each datagram).
    fn steady_state_bytes_per_node_per_second(n: usize, seed: u64) -> (f64, f64) {
        let mut net = Net::new(n, seed, 20, 175);
        net.run_until_true(secs(30), Net::all_see_all)
            .expect("converged within 30 s");
        net.run_until(secs(60));
        let before: u64 = net.bytes_sent.iter().sum();
        let datagrams_before: u64 = net.live().map(|(_, s)| s.counters().datagrams_out).sum();
        net.run_until(secs(180));
        let bytes = net.bytes_sent.iter().sum::<u64>() - before;
        let datagrams = net
            .live()
            .map(|(_, s)| s.counters().datagrams_out)
            .sum::<u64>()
            - datagrams_before;
        assert!(net.downs().is_empty(), "false positives at N={n}");
        assert!(net.errors.is_empty(), "{:?}", net.errors);
        let per_node_s = bytes as f64 / n as f64 / 120.0;
        let dgrams_per_node_s = datagrams as f64 / n as f64 / 120.0;
        (per_node_s, dgrams_per_node_s)
    }

    /// 6. Steady-state cost at N = 30 and N = 100. Each node pings once per period and answers
    ///    about one ping per period (~25-byte datagrams), plus a periodic announce whose reply
    ///    carries up to a full packet: well under 500 B/s per node at either size.
    #[test]
    fn swim_steady_state_bandwidth() {
        for (n, seed) in [(30, 0x5717_0030), (100, 0x5717_0100)] {
            let (bytes, dgrams) = steady_state_bytes_per_node_per_second(n, seed);
            println!("N={n}: {bytes:.1} bytes/node/s, {dgrams:.2} datagrams/node/s");
            assert!(bytes < 500.0, "N={n}: {bytes:.1} B/node/s");
            assert!(dgrams < 5.0, "N={n}: {dgrams:.2} datagrams/node/s");
        }
    }
}
