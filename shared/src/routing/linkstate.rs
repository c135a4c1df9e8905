//! The link-state database: every node's measurements of its direct links, versioned per
//! origin.
//!
//! Each node (an *origin*) owns its record: one [`LinkMetrics`] per direct link it probes.
//! When measurements move enough to matter, the origin bumps its sequence number and
//! publishes a *delta* — only the entries that changed — as a [`LinkUpdate`]. Every entry
//! remembers the sequence number that last changed it, so any node can later serve "what
//! changed in this origin's record since seq N" to a peer that is behind (anti-entropy),
//! and a steady mesh sends almost nothing. Records are merged by sequence number only:
//! newer wins, no clocks are compared.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::RoutingConfig;
use super::stats::PathStats;
use super::time::Timestamp;
use super::wire::NodeKey;

/// One direct link as measured by its origin, compact on the wire (postcard varints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkMetrics {
    /// Smoothed RTT in microseconds.
    pub srtt_us: u32,
    /// Recent (median of last samples) RTT in microseconds.
    pub recent_us: u32,
    /// Loss over the probe window, in thousandths.
    pub loss_permille: u16,
    /// False once the origin declared the link dead.
    pub alive: bool,
}

fn to_us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl LinkMetrics {
    /// Metrics of a probed path, or `None` if it has no RTT sample yet.
    pub fn from_stats(stats: &PathStats) -> Option<Self> {
        let srtt = stats.srtt()?;
        Some(LinkMetrics {
            srtt_us: to_us(srtt),
            recent_us: to_us(stats.recent_rtt().unwrap_or(srtt)),
            loss_permille: (stats.loss() * 1000.0).round().clamp(0.0, 1000.0) as u16,
            alive: !stats.is_dead(),
        })
    }

    /// Smoothed RTT.
    pub fn srtt(&self) -> Duration {
        Duration::from_micros(u64::from(self.srtt_us))
    }

    /// Recent RTT.
    pub fn recent(&self) -> Duration {
        Duration::from_micros(u64::from(self.recent_us))
    }

    /// Loss fraction in `0..=1`.
    pub fn loss(&self) -> f64 {
        f64::from(self.loss_permille.min(1000)) / 1000.0
    }

    /// Whether `self` differs from the last published `old` enough to publish again:
    /// liveness changed, loss moved by `publish_min_loss_change_percent` points, or the
    /// smoothed or recent RTT moved by both `publish_min_change_ms` and
    /// `publish_min_change_percent`.
    pub fn differs_significantly(&self, old: &LinkMetrics, config: &RoutingConfig) -> bool {
        if self.alive != old.alive {
            return true;
        }
        let loss_points = (i32::from(self.loss_permille) - i32::from(old.loss_permille)).abs();
        if loss_points >= (config.publish_min_loss_change_percent * 10) as i32 {
            return true;
        }
        let moved = |new: u32, old: u32| {
            let diff = u64::from(new.abs_diff(old));
            diff >= config.publish_min_change_ms * 1000
                && diff * 100 >= u64::from(old) * config.publish_min_change_percent
        };
        moved(self.srtt_us, old.srtt_us) || moved(self.recent_us, old.recent_us)
    }
}

/// A change to one origin's record: the entries changed after `base_seq`, bringing a
/// receiver that holds at least `base_seq` up to `seq`. `base_seq == 0` is a full record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "N: NodeKey", serialize = "N: NodeKey"))]
pub struct LinkUpdate<N> {
    /// The node whose links these are.
    pub origin: N,
    /// The receiver must hold this version (or newer) to advance to `seq`.
    pub base_seq: u64,
    /// The version this update brings the record to.
    pub seq: u64,
    /// Changed entries: (far end of the link, its metrics).
    pub links: Vec<(N, LinkMetrics)>,
}

/// What [`LinkStateDb::apply`] did with an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Nothing new: we already hold `seq` or later.
    Stale,
    /// The record advanced to the update's `seq`.
    Applied,
    /// We are behind `base_seq`: the entries were taken, but the record could not advance;
    /// the sender should be asked for what we miss.
    Gap,
    /// The update is about ourselves and carries a sequence number at least ours (we
    /// restarted): the caller must publish its record above it.
    SelfSuperseded,
}

/// One origin's record.
#[derive(Clone, Debug)]
struct OriginRecord<N> {
    /// Highest version fully held.
    seq: u64,
    /// Far end → (metrics, version that last changed the entry).
    links: BTreeMap<N, (LinkMetrics, u64)>,
    /// When this record last changed locally, for operators.
    updated_at: Timestamp,
}

/// Every origin's link record, as known locally.
#[derive(Clone, Debug)]
pub struct LinkStateDb<N> {
    /// Origin → record.
    origins: BTreeMap<N, OriginRecord<N>>,
    /// Bumped on every change, so derived caches (the cost graph) know when to rebuild.
    generation: u64,
}

impl<N> Default for LinkStateDb<N> {
    fn default() -> Self {
        LinkStateDb {
            origins: BTreeMap::new(),
            generation: 0,
        }
    }
}

impl<N: NodeKey> LinkStateDb<N> {
    /// An empty database.
    pub fn new() -> Self {
        LinkStateDb::default()
    }

    /// Changes whenever the content changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Merges an update received from a peer. `me` is the local node.
    pub fn apply(&mut self, now: Timestamp, me: &N, update: &LinkUpdate<N>) -> ApplyOutcome {
        if &update.origin == me {
            let mine = self.origins.get(me).map_or(0, |r| r.seq);
            return if update.seq > mine {
                ApplyOutcome::SelfSuperseded
            } else {
                ApplyOutcome::Stale
            };
        }
        let record = self
            .origins
            .entry(update.origin.clone())
            .or_insert_with(|| OriginRecord {
                seq: 0,
                links: BTreeMap::new(),
                updated_at: now,
            });
        if update.seq <= record.seq {
            return ApplyOutcome::Stale;
        }
        let mut changed = false;
        for (peer, metrics) in &update.links {
            if peer == &update.origin {
                continue;
            }
            let newer = record
                .links
                .get(peer)
                .is_none_or(|(_, version)| *version < update.seq);
            if newer {
                record.links.insert(peer.clone(), (*metrics, update.seq));
                changed = true;
            }
        }
        let outcome = if record.seq >= update.base_seq {
            record.seq = update.seq;
            changed = true;
            ApplyOutcome::Applied
        } else {
            ApplyOutcome::Gap
        };
        if changed {
            record.updated_at = now;
            self.generation += 1;
        }
        outcome
    }

    /// Records the local node's changed links as a new version of its own record and
    /// returns the delta to gossip.
    pub fn publish_own(
        &mut self,
        now: Timestamp,
        me: &N,
        changed: Vec<(N, LinkMetrics)>,
    ) -> LinkUpdate<N> {
        let record = self
            .origins
            .entry(me.clone())
            .or_insert_with(|| OriginRecord {
                seq: 0,
                links: BTreeMap::new(),
                updated_at: now,
            });
        let base_seq = record.seq;
        record.seq = record.seq.saturating_add(1);
        for (peer, metrics) in &changed {
            record.links.insert(peer.clone(), (*metrics, record.seq));
        }
        record.updated_at = now;
        self.generation += 1;
        LinkUpdate {
            origin: me.clone(),
            base_seq,
            seq: record.seq,
            links: changed,
        }
    }

    /// After a restart was detected ([`ApplyOutcome::SelfSuperseded`]), moves the local
    /// record above `seen_seq` and returns a full record to gossip.
    pub fn supersede_own(&mut self, now: Timestamp, me: &N, seen_seq: u64) -> LinkUpdate<N> {
        let record = self
            .origins
            .entry(me.clone())
            .or_insert_with(|| OriginRecord {
                seq: 0,
                links: BTreeMap::new(),
                updated_at: now,
            });
        // `seen_seq` came from a peer; gossip drops values above `MAX_SEQ`, and saturating
        // keeps a direct caller from overflowing too.
        record.seq = record.seq.max(seen_seq).saturating_add(1);
        let seq = record.seq;
        for entry in record.links.values_mut() {
            entry.1 = seq;
        }
        record.updated_at = now;
        self.generation += 1;
        LinkUpdate {
            origin: me.clone(),
            base_seq: 0,
            seq,
            links: record
                .links
                .iter()
                .map(|(p, (m, _))| (p.clone(), *m))
                .collect(),
        }
    }

    /// Entries of `origin` changed after `base_seq`, or `None` if the receiver is current.
    pub fn delta_since(&self, origin: &N, base_seq: u64) -> Option<LinkUpdate<N>> {
        let record = self.origins.get(origin)?;
        if record.seq <= base_seq || record.seq == 0 {
            return None;
        }
        Some(LinkUpdate {
            origin: origin.clone(),
            base_seq,
            seq: record.seq,
            links: record
                .links
                .iter()
                .filter(|(_, (_, version))| *version > base_seq)
                .map(|(peer, (metrics, _))| (peer.clone(), *metrics))
                .collect(),
        })
    }

    /// (origin, version) for every origin: the anti-entropy digest.
    pub fn versions(&self) -> Vec<(N, u64)> {
        self.origins
            .iter()
            .filter(|(_, r)| r.seq > 0)
            .map(|(origin, r)| (origin.clone(), r.seq))
            .collect()
    }

    /// The version held for `origin` (0 if none).
    pub fn version(&self, origin: &N) -> u64 {
        self.origins.get(origin).map_or(0, |r| r.seq)
    }

    /// What `from` last reported about its link to `to`.
    pub fn link(&self, from: &N, to: &N) -> Option<&LinkMetrics> {
        self.origins.get(from)?.links.get(to).map(|(m, _)| m)
    }

    /// Every (origin, far end, metrics, version of the origin's record, last change).
    pub fn iter(&self) -> impl Iterator<Item = (&N, &N, &LinkMetrics, u64, Timestamp)> {
        self.origins.iter().flat_map(|(origin, record)| {
            record
                .links
                .iter()
                .map(move |(peer, (m, _))| (origin, peer, m, record.seq, record.updated_at))
        })
    }

    /// Forgets an origin (it left the mesh) and every link reported towards it.
    pub fn remove_node(&mut self, node: &N) {
        self.origins.remove(node);
        for record in self.origins.values_mut() {
            record.links.remove(node);
        }
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::wire::PeerIndex;

    fn m(srtt_ms: u32) -> LinkMetrics {
        LinkMetrics {
            srtt_us: srtt_ms * 1000,
            recent_us: srtt_ms * 1000,
            loss_permille: 0,
            alive: true,
        }
    }

    const A: PeerIndex = PeerIndex(1);
    const B: PeerIndex = PeerIndex(2);
    const C: PeerIndex = PeerIndex(3);
    const ME: PeerIndex = PeerIndex(9);

    #[test]
    fn deltas_bring_a_lagging_node_up_to_date() {
        let t = Timestamp::ZERO;
        let mut origin_db = LinkStateDb::new();
        let u1 = origin_db.publish_own(t, &A, vec![(B, m(10)), (C, m(20))]);
        let u2 = origin_db.publish_own(t, &A, vec![(B, m(15))]);
        assert_eq!((u2.base_seq, u2.seq, u2.links.len()), (1, 2, 1));

        let mut db = LinkStateDb::new();
        assert_eq!(db.apply(t, &ME, &u2), ApplyOutcome::Gap);
        assert_eq!(db.version(&A), 0);
        assert_eq!(db.link(&A, &B), Some(&m(15)));
        // The gap is closed by a delta from what we hold.
        let fill = origin_db.delta_since(&A, db.version(&A)).expect("behind");
        assert_eq!(db.apply(t, &ME, &fill), ApplyOutcome::Applied);
        assert_eq!(db.version(&A), 2);
        assert_eq!(db.link(&A, &C), Some(&m(20)));
        assert_eq!(db.apply(t, &ME, &u1), ApplyOutcome::Stale);
        assert_eq!(
            db.link(&A, &B),
            Some(&m(15)),
            "old update does not roll back"
        );
        assert_eq!(origin_db.delta_since(&A, 2), None);
    }

    #[test]
    fn out_of_order_partial_updates_never_regress_entries() {
        let t = Timestamp::ZERO;
        let mut origin_db = LinkStateDb::new();
        origin_db.publish_own(t, &A, vec![(B, m(10))]);
        let u2 = origin_db.publish_own(t, &A, vec![(B, m(20))]);
        let u3 = origin_db.publish_own(t, &A, vec![(B, m(30))]);
        let mut db = LinkStateDb::new();
        db.apply(t, &ME, &u3);
        db.apply(t, &ME, &u2);
        assert_eq!(db.link(&A, &B), Some(&m(30)));
    }

    #[test]
    fn restart_is_detected_and_superseded() {
        let t = Timestamp::ZERO;
        let mut db = LinkStateDb::new();
        let old = LinkUpdate {
            origin: ME,
            base_seq: 0,
            seq: 40,
            links: vec![(A, m(5))],
        };
        assert_eq!(db.apply(t, &ME, &old), ApplyOutcome::SelfSuperseded);
        db.publish_own(t, &ME, vec![(A, m(7))]);
        let full = db.supersede_own(t, &ME, 40);
        assert_eq!((full.base_seq, full.seq), (0, 41));
        assert_eq!(full.links, vec![(A, m(7))]);
    }

    #[test]
    fn significance_thresholds() {
        let config = RoutingConfig::default();
        assert!(!m(100).differs_significantly(&m(100), &config));
        assert!(!m(104).differs_significantly(&m(100), &config), "4 %");
        assert!(m(106).differs_significantly(&m(100), &config));
        assert!(
            !m(11).differs_significantly(&m(10), &config),
            "10 % but 1 ms"
        );
        let mut dead = m(100);
        dead.alive = false;
        assert!(dead.differs_significantly(&m(100), &config));
        let mut lossy = m(100);
        lossy.loss_permille = 30;
        assert!(lossy.differs_significantly(&m(100), &config));
    }

    #[test]
    fn remove_node_drops_its_record_and_links_towards_it() {
        let t = Timestamp::ZERO;
        let mut db = LinkStateDb::new();
        db.apply(
            t,
            &ME,
            &LinkUpdate {
                origin: A,
                base_seq: 0,
                seq: 1,
                links: vec![(B, m(1))],
            },
        );
        db.apply(
            t,
            &ME,
            &LinkUpdate {
                origin: B,
                base_seq: 0,
                seq: 1,
                links: vec![(A, m(1))],
            },
        );
        db.remove_node(&A);
        assert_eq!(db.iter().count(), 0);
    }
}
