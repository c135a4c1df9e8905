//! Epidemic dissemination of link-state updates.
//!
//! Two mechanisms, both bounded:
//!
//! - **Push of fresh deltas.** An update that taught us something new is pushed, in the next
//!   gossip round, to `gossip_fanout` random peers, for `gossip_retransmits` rounds. With a
//!   fanout of 3 a delta reaches nearly every node in about log₃ N rounds; its cost is
//!   proportional to the size of the *change*, not of the mesh.
//! - **Anti-entropy.** Every `anti_entropy_interval_ms` a node sends its version digest
//!   (origin, seq) to one random peer, which answers with the deltas the sender lacks and,
//!   if it is itself behind, with its own digest. This repairs whatever pushes missed,
//!   brings new and restarted nodes up to date, and costs O(N) small entries per period.
//!
//! Messages are packed up to `max_datagram_bytes`.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::config::RoutingConfig;
use super::linkstate::{ApplyOutcome, LinkStateDb, LinkUpdate};
use super::time::Timestamp;
use super::wire::NodeKey;

/// A gossip datagram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "N: NodeKey", serialize = "N: NodeKey"))]
pub enum GossipMessage<N> {
    /// Link-state deltas.
    Push {
        /// The deltas, each for one origin.
        updates: Vec<LinkUpdate<N>>,
    },
    /// The sender's versions, asking for anything newer.
    Digest {
        /// (origin, highest seq held).
        versions: Vec<(N, u64)>,
        /// True when this digest answers another one; it is not answered with a digest.
        reply: bool,
        /// False for a targeted pull naming only some origins: origins it does not list
        /// are not missing at the sender, so nothing is sent for them.
        complete: bool,
    },
}

/// The highest sequence number a record may carry. An honest node counts up by one per
/// change, so it never gets near this; a value above it came from a broken or hostile
/// member and is dropped, which keeps `seq + 1` from overflowing anywhere.
pub const MAX_SEQ: u64 = 1 << 62;

impl<N: NodeKey> GossipMessage<N> {
    /// Keeps only what may enter the link-state database: records whose origin and link
    /// ends are mesh members, with sequence numbers in range. Returns how many records
    /// or entries were dropped.
    pub fn retain_valid(&mut self, is_member: impl Fn(&N) -> bool) -> usize {
        let mut dropped = 0;
        match self {
            GossipMessage::Push { updates } => {
                updates.retain(|u| {
                    let keep = is_member(&u.origin) && u.seq <= MAX_SEQ && u.base_seq < u.seq;
                    dropped += usize::from(!keep);
                    keep
                });
                for update in updates.iter_mut() {
                    let before = update.links.len();
                    update.links.retain(|(peer, _)| is_member(peer));
                    dropped += before - update.links.len();
                }
            }
            GossipMessage::Digest { versions, .. } => {
                let before = versions.len();
                versions.retain(|(origin, seq)| is_member(origin) && *seq <= MAX_SEQ);
                dropped += before - versions.len();
            }
        }
        dropped
    }
}

/// Rough postcard size of a message, for packing.
fn encoded_len<N: NodeKey>(message: &GossipMessage<N>) -> usize {
    postcard::to_allocvec(message).map_or(usize::MAX, |v| v.len())
}

/// Splits `updates` into `Push` messages of at most `max_bytes` each (an update larger
/// than that travels alone).
pub fn pack_updates<N: NodeKey>(
    updates: Vec<LinkUpdate<N>>,
    max_bytes: usize,
) -> Vec<GossipMessage<N>> {
    let mut messages = Vec::new();
    let mut current: Vec<LinkUpdate<N>> = Vec::new();
    // Varint headers of the message and vector: a few bytes.
    let mut size = 4;
    for update in updates {
        let len = postcard::to_allocvec(&update).map_or(max_bytes, |v| v.len());
        if !current.is_empty() && size + len > max_bytes {
            messages.push(GossipMessage::Push {
                updates: std::mem::take(&mut current),
            });
            size = 4;
        }
        size += len;
        current.push(update);
    }
    if !current.is_empty() {
        messages.push(GossipMessage::Push { updates: current });
    }
    messages
}

fn pack_digest<N: NodeKey>(
    versions: Vec<(N, u64)>,
    reply: bool,
    complete: bool,
    max_bytes: usize,
) -> Vec<GossipMessage<N>> {
    let whole = GossipMessage::Digest {
        versions: versions.clone(),
        reply,
        complete,
    };
    let len = encoded_len(&whole);
    if len <= max_bytes || versions.len() < 2 {
        return vec![whole];
    }
    let parts = len.div_ceil(max_bytes);
    let per_part = versions.len().div_ceil(parts);
    versions
        .chunks(per_part)
        .map(|chunk| GossipMessage::Digest {
            versions: chunk.to_vec(),
            reply,
            // A split digest cannot say "I lack everything else".
            complete: false,
        })
        .collect()
}

/// Dissemination state of one node.
#[derive(Clone, Debug)]
pub struct Gossiper<N> {
    /// Fresh updates still to push, with the rounds left.
    hot: VecDeque<(LinkUpdate<N>, u32)>,
    /// Next push round.
    next_round_at: Timestamp,
    /// Next anti-entropy exchange.
    next_anti_entropy_at: Timestamp,
}

/// What handling a gossip message produced.
#[derive(Debug, Default)]
pub struct GossipOutput<N> {
    /// Messages to send back to the sender.
    pub replies: Vec<GossipMessage<N>>,
    /// An update about ourselves with a sequence number at least ours was seen: the
    /// caller must supersede its record above this seq.
    pub superseded_at: Option<u64>,
    /// Whether the database changed.
    pub changed: bool,
}

impl<N: NodeKey> Gossiper<N> {
    /// Starts the timers at `now` (anti-entropy at a random phase).
    pub fn new(now: Timestamp, config: &RoutingConfig, rng: &mut StdRng) -> Self {
        use rand::Rng;
        let phase =
            RoutingConfig::ms(config.anti_entropy_interval_ms).mul_f64(rng.random_range(0.0..1.0));
        Gossiper {
            hot: VecDeque::new(),
            next_round_at: now + RoutingConfig::ms(config.gossip_interval_ms),
            next_anti_entropy_at: now + phase,
        }
    }

    /// Queues an update for pushing (a fresh own delta, or one just learned).
    pub fn push_fresh(&mut self, update: LinkUpdate<N>, config: &RoutingConfig) {
        if config.gossip_retransmits > 0 {
            self.hot.push_back((update, config.gossip_retransmits));
        }
    }

    /// When [`Gossiper::poll`] next has work.
    pub fn next_deadline(&self) -> Timestamp {
        self.next_round_at.min(self.next_anti_entropy_at)
    }

    /// Runs due rounds: returns (peer, message) pairs to send. `peers` are the candidates
    /// for random selection (live members other than ourselves).
    pub fn poll(
        &mut self,
        now: Timestamp,
        db: &LinkStateDb<N>,
        peers: &[N],
        config: &RoutingConfig,
        rng: &mut StdRng,
    ) -> Vec<(N, GossipMessage<N>)> {
        let mut out = Vec::new();
        let max_bytes = config.max_datagram_bytes as usize;
        if now >= self.next_round_at {
            self.next_round_at = now + RoutingConfig::ms(config.gossip_interval_ms);
            if !self.hot.is_empty() && !peers.is_empty() {
                let updates: Vec<LinkUpdate<N>> = self.hot.iter().map(|(u, _)| u.clone()).collect();
                for (_, rounds) in &mut self.hot {
                    *rounds -= 1;
                }
                self.hot.retain(|(_, rounds)| *rounds > 0);
                let messages = pack_updates(updates, max_bytes);
                for peer in peers.choose_multiple(rng, config.gossip_fanout as usize) {
                    for message in &messages {
                        out.push((peer.clone(), message.clone()));
                    }
                }
            }
        }
        if now >= self.next_anti_entropy_at {
            self.next_anti_entropy_at = now + RoutingConfig::ms(config.anti_entropy_interval_ms);
            if let Some(peer) = peers.choose(rng) {
                for message in pack_digest(db.versions(), false, true, max_bytes) {
                    out.push((peer.clone(), message));
                }
            }
        }
        out
    }

    /// Merges a message from a peer into `db`.
    pub fn handle(
        &mut self,
        now: Timestamp,
        me: &N,
        message: GossipMessage<N>,
        db: &mut LinkStateDb<N>,
        config: &RoutingConfig,
    ) -> GossipOutput<N> {
        let mut output = GossipOutput {
            replies: Vec::new(),
            superseded_at: None,
            changed: false,
        };
        let max_bytes = config.max_datagram_bytes as usize;
        match message {
            GossipMessage::Push { updates } => {
                let mut behind = Vec::new();
                for update in updates {
                    match db.apply(now, me, &update) {
                        ApplyOutcome::Stale => {}
                        ApplyOutcome::Applied => {
                            output.changed = true;
                            self.push_fresh(update, config);
                        }
                        ApplyOutcome::Gap => {
                            output.changed = true;
                            behind.push((update.origin.clone(), db.version(&update.origin)));
                        }
                        ApplyOutcome::SelfSuperseded => {
                            output.superseded_at =
                                Some(output.superseded_at.unwrap_or(0).max(update.seq));
                        }
                    }
                }
                if !behind.is_empty() {
                    // Targeted pull: the sender holds what we miss.
                    output
                        .replies
                        .extend(pack_digest(behind, true, false, max_bytes));
                }
            }
            GossipMessage::Digest {
                versions,
                reply,
                complete,
            } => {
                let mut deltas = Vec::new();
                let mut they_are_ahead = false;
                let theirs: std::collections::BTreeMap<&N, u64> =
                    versions.iter().map(|(n, v)| (n, *v)).collect();
                for (origin, seq) in db.versions() {
                    let their_seq = match theirs.get(&origin) {
                        Some(v) => *v,
                        None if complete => 0,
                        None => continue,
                    };
                    if seq > their_seq
                        && let Some(delta) = db.delta_since(&origin, their_seq)
                    {
                        deltas.push(delta);
                    }
                }
                for (origin, their_seq) in &versions {
                    if origin == me {
                        if *their_seq > db.version(me) {
                            output.superseded_at =
                                Some(output.superseded_at.unwrap_or(0).max(*their_seq));
                        }
                    } else if *their_seq > db.version(origin) {
                        they_are_ahead = true;
                    }
                }
                output.replies.extend(pack_updates(deltas, max_bytes));
                if they_are_ahead && !reply {
                    output
                        .replies
                        .extend(pack_digest(db.versions(), true, true, max_bytes));
                }
            }
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::linkstate::LinkMetrics;
    use crate::routing::wire::PeerIndex;
    use rand::SeedableRng;

    fn m(srtt_ms: u32) -> LinkMetrics {
        LinkMetrics {
            srtt_us: srtt_ms * 1000,
            recent_us: srtt_ms * 1000,
            loss_permille: 0,
            alive: true,
        }
    }

    #[test]
    fn digest_exchange_repairs_both_sides() {
        let config = RoutingConfig::default();
        let t = Timestamp::ZERO;
        let (a, b) = (PeerIndex(0), PeerIndex(1));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ga = Gossiper::new(t, &config, &mut rng);
        let mut gb = Gossiper::new(t, &config, &mut rng);
        let mut da = LinkStateDb::new();
        let mut db = LinkStateDb::new();
        da.publish_own(t, &a, vec![(PeerIndex(5), m(10))]);
        db.publish_own(t, &b, vec![(PeerIndex(6), m(20))]);

        // a → b: digest; b answers with its delta and, being behind, its own digest.
        let out = gb.handle(
            t,
            &b,
            GossipMessage::Digest {
                versions: da.versions(),
                reply: false,
                complete: true,
            },
            &mut db,
            &config,
        );
        assert_eq!(out.replies.len(), 2);
        let mut back = Vec::new();
        for reply in out.replies {
            back.extend(ga.handle(t, &a, reply, &mut da, &config).replies);
        }
        assert_eq!(da.link(&b, &PeerIndex(6)), Some(&m(20)));
        for reply in back {
            gb.handle(t, &b, reply, &mut db, &config);
        }
        assert_eq!(db.link(&a, &PeerIndex(5)), Some(&m(10)));
    }

    #[test]
    fn packing_respects_the_datagram_size() {
        let updates: Vec<LinkUpdate<PeerIndex>> = (0..40)
            .map(|o| LinkUpdate {
                origin: PeerIndex(o),
                base_seq: 0,
                seq: 1,
                links: (0..30)
                    .map(|p| (PeerIndex(p), m(100 + u32::from(p))))
                    .collect(),
            })
            .collect();
        let messages = pack_updates(updates, 1200);
        assert!(messages.len() > 1);
        let mut total = 0;
        for message in &messages {
            assert!(encoded_len(message) <= 1200);
            if let GossipMessage::Push { updates } = message {
                total += updates.len();
            }
        }
        assert_eq!(total, 40);
    }

    #[test]
    fn fresh_updates_are_pushed_to_fanout_peers_then_go_quiet() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(2);
        let me = PeerIndex(0);
        let mut g = Gossiper::new(Timestamp::ZERO, &config, &mut rng);
        let mut db = LinkStateDb::new();
        let update = db.publish_own(Timestamp::ZERO, &me, vec![(PeerIndex(1), m(3))]);
        g.push_fresh(update, &config);
        let peers: Vec<PeerIndex> = (1..10).map(PeerIndex).collect();
        let pushes = |out: &[(PeerIndex, GossipMessage<PeerIndex>)]| {
            out.iter()
                .filter(|(_, m)| matches!(m, GossipMessage::Push { .. }))
                .count()
        };
        let out = g.poll(Timestamp::from_millis(200), &db, &peers, &config, &mut rng);
        assert_eq!(pushes(&out), 3);
        let out = g.poll(Timestamp::from_millis(400), &db, &peers, &config, &mut rng);
        assert_eq!(pushes(&out), 0);
    }
}
