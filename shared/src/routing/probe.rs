//! The probe scheduler: which paths to probe, when, and what their probes returned.
//!
//! Each probed path has a class that sets its cadence: the path carrying traffic to a
//! destination is probed every `active_probe_interval_ms`, its warm alternatives every
//! `standby_probe_interval_ms`, and every other direct link every
//! `idle_probe_interval_ms`. An active or standby path that just missed a probe drops to
//! `suspect_probe_interval_ms` until it answers or dies, so a failure is confirmed in well
//! under a second without calling a path dead for one lost packet. Probe times carry ±10 %
//! random jitter so nodes started together do not probe in lockstep.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::config::RoutingConfig;
use super::stats::{LivenessChange, PathStats};
use super::time::Timestamp;
use super::wire::{NodeKey, Path};

/// How often a path is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ProbeClass {
    /// A direct link that no route currently uses: measured for the link-state gossip.
    Idle,
    /// An alternative kept warm for failover and for hysteresis comparisons.
    Standby,
    /// Carries traffic.
    Active,
}

impl ProbeClass {
    fn interval(self, config: &RoutingConfig) -> Duration {
        RoutingConfig::ms(match self {
            ProbeClass::Idle => config.idle_probe_interval_ms,
            ProbeClass::Standby => config.standby_probe_interval_ms,
            ProbeClass::Active => config.active_probe_interval_ms,
        })
    }
}

/// How many timed-out probes per path are remembered so a late reply still counts.
const LATE_PROBES_KEPT: usize = 4;

/// One probed path.
#[derive(Clone, Debug)]
pub struct ProbedPath {
    /// Measurements.
    pub stats: PathStats,
    /// Cadence.
    pub class: ProbeClass,
    /// When the next probe is due.
    next_probe_at: Timestamp,
    /// Probes awaiting a reply: (id, sent at, give up at).
    outstanding: VecDeque<(u64, Timestamp, Timestamp)>,
    /// Probes that timed out recently: (id, sent at), to accept late replies.
    late: VecDeque<(u64, Timestamp)>,
}

/// A probe the caller must send along `path` (to `path.first_hop()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeToSend<N> {
    /// The probed path.
    pub path: Path<N>,
    /// The probe's id, to be carried in the frame.
    pub id: u64,
}

/// Schedules probes over a set of paths and keeps their statistics.
#[derive(Clone, Debug)]
pub struct Prober<N> {
    paths: BTreeMap<Path<N>, ProbedPath>,
    next_id: u64,
}

impl<N> Default for Prober<N> {
    fn default() -> Self {
        Prober {
            paths: BTreeMap::new(),
            next_id: 1,
        }
    }
}

fn jittered(interval: Duration, rng: &mut StdRng) -> Duration {
    interval.mul_f64(rng.random_range(0.9..1.1))
}

impl<N: NodeKey> Prober<N> {
    /// An empty prober.
    pub fn new() -> Self {
        Prober::default()
    }

    /// Starts probing `path` at `class` cadence, or changes the class of a known path. A
    /// new path gets its first probe at a random point of its first interval (at most one
    /// standby interval away), so a node that learns many peers at once does not burst.
    pub fn set_class(
        &mut self,
        now: Timestamp,
        path: &Path<N>,
        class: ProbeClass,
        config: &RoutingConfig,
        rng: &mut StdRng,
    ) {
        let interval = class.interval(config);
        match self.paths.get_mut(path) {
            Some(probed) => {
                if probed.class != class {
                    probed.class = class;
                    // On promotion probe soon; on demotion let the pending probe stand.
                    probed.next_probe_at = probed.next_probe_at.min(now + jittered(interval, rng));
                }
            }
            None => {
                let first = interval.min(RoutingConfig::ms(config.standby_probe_interval_ms));
                let offset = first.mul_f64(rng.random_range(0.0..1.0));
                self.paths.insert(
                    path.clone(),
                    ProbedPath {
                        stats: PathStats::new(),
                        class,
                        next_probe_at: now + offset,
                        outstanding: VecDeque::new(),
                        late: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// Stops probing `path` and forgets its statistics.
    pub fn remove(&mut self, path: &Path<N>) {
        self.paths.remove(path);
    }

    /// Stops probing every path for which `keep` returns false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path<N>, &ProbedPath) -> bool) {
        self.paths.retain(|path, probed| keep(path, probed));
    }

    /// The probed path, if known.
    pub fn path(&self, path: &Path<N>) -> Option<&ProbedPath> {
        self.paths.get(path)
    }

    /// Statistics of `path`, if it is probed.
    pub fn stats(&self, path: &Path<N>) -> Option<&PathStats> {
        self.paths.get(path).map(|p| &p.stats)
    }

    /// All probed paths.
    pub fn iter(&self) -> impl Iterator<Item = (&Path<N>, &ProbedPath)> {
        self.paths.iter()
    }

    /// Counts timed-out probes as missed. Returns the paths whose liveness changed.
    pub fn handle_timeouts(
        &mut self,
        now: Timestamp,
        config: &RoutingConfig,
    ) -> Vec<(Path<N>, LivenessChange)> {
        let mut changes = Vec::new();
        for (path, probed) in &mut self.paths {
            // Timeouts shrink once a path has samples, so deadlines are not in send order.
            while let Some(pos) = probed.outstanding.iter().position(|o| o.2 <= now) {
                let Some((id, sent, _)) = probed.outstanding.remove(pos) else {
                    break;
                };
                probed.late.push_back((id, sent));
                if probed.late.len() > LATE_PROBES_KEPT {
                    probed.late.pop_front();
                }
                if let Some(change) = probed.stats.on_missed(id, config) {
                    changes.push((path.clone(), change));
                }
                if probed.class != ProbeClass::Idle && !probed.stats.is_dead() {
                    // Suspect: confirm or clear quickly.
                    let soon = now + RoutingConfig::ms(config.suspect_probe_interval_ms);
                    probed.next_probe_at = probed.next_probe_at.min(soon);
                }
            }
        }
        changes
    }

    /// Returns the probes due at `now` and schedules their successors.
    pub fn poll_probes(
        &mut self,
        now: Timestamp,
        config: &RoutingConfig,
        rng: &mut StdRng,
    ) -> Vec<ProbeToSend<N>> {
        let mut due = Vec::new();
        for (path, probed) in &mut self.paths {
            if probed.next_probe_at > now {
                continue;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let timeout = probed.stats.probe_timeout(config);
            probed.outstanding.push_back((id, now, now + timeout));
            let suspect = probed.class != ProbeClass::Idle
                && probed.stats.consecutive_missed() > 0
                && !probed.stats.is_dead();
            let interval = if suspect {
                RoutingConfig::ms(config.suspect_probe_interval_ms)
            } else {
                jittered(probed.class.interval(config), rng)
            };
            probed.next_probe_at = now + interval;
            due.push(ProbeToSend {
                path: path.clone(),
                id,
            });
        }
        due
    }

    /// Records the reply to probe `id` on `path`. Returns `Err` if no such probe is
    /// pending (a duplicate, a forgery, or a reply too late to remember), else the
    /// measured RTT and any liveness change.
    pub fn handle_reply(
        &mut self,
        now: Timestamp,
        path: &Path<N>,
        id: u64,
        config: &RoutingConfig,
    ) -> Result<(Duration, Option<LivenessChange>), UnknownProbe> {
        let probed = self.paths.get_mut(path).ok_or(UnknownProbe)?;
        let sent = if let Some(pos) = probed.outstanding.iter().position(|(i, ..)| *i == id) {
            probed.outstanding.remove(pos).map(|(_, sent, _)| sent)
        } else if let Some(pos) = probed.late.iter().position(|(i, _)| *i == id) {
            probed.late.remove(pos).map(|(_, sent)| sent)
        } else {
            None
        };
        let sent = sent.ok_or(UnknownProbe)?;
        let rtt = now.saturating_since(sent);
        let change = probed.stats.on_reply(now, id, rtt, config);
        Ok((rtt, change))
    }

    /// The earliest time [`Prober::poll_probes`] or [`Prober::handle_timeouts`] has work.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.paths
            .values()
            .flat_map(|p| std::iter::once(p.next_probe_at).chain(p.outstanding.iter().map(|o| o.2)))
            .min()
    }
}

/// A reply matched no pending probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reply matches no pending probe")]
pub struct UnknownProbe;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::stats::PathState;
    use crate::routing::wire::PeerIndex;
    use rand::SeedableRng;

    fn path() -> Path<PeerIndex> {
        Path::direct(PeerIndex(0), PeerIndex(1)).expect("valid path")
    }

    /// Runs the prober alone for `until`, answering each probe after `rtt` while `up`
    /// says the path works; returns every probe send time.
    fn drive(
        prober: &mut Prober<PeerIndex>,
        config: &RoutingConfig,
        rng: &mut StdRng,
        from: Timestamp,
        until: Timestamp,
        rtt: Duration,
        up: impl Fn(Timestamp) -> bool,
    ) -> (Vec<Timestamp>, Vec<(Timestamp, LivenessChange)>) {
        let mut now = from;
        let mut sends = Vec::new();
        let mut changes = Vec::new();
        let mut replies: Vec<(Timestamp, u64)> = Vec::new();
        while now < until {
            for (path, change) in prober.handle_timeouts(now, config) {
                assert_eq!(path, self::path());
                changes.push((now, change));
            }
            replies.sort();
            while replies.first().is_some_and(|r| r.0 <= now) {
                let (_, id) = replies.remove(0);
                if let Ok((_, Some(change))) = prober.handle_reply(now, &path(), id, config) {
                    changes.push((now, change));
                }
            }
            for probe in prober.poll_probes(now, config, rng) {
                sends.push(now);
                if up(now) && up(now + rtt) {
                    replies.push((now + rtt, probe.id));
                }
            }
            now += Duration::from_millis(1);
        }
        (sends, changes)
    }

    #[test]
    fn cadence_follows_class() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(1);
        for (class, expected) in [
            (ProbeClass::Active, 40),
            (ProbeClass::Standby, 10),
            (ProbeClass::Idle, 2),
        ] {
            let mut prober = Prober::new();
            prober.set_class(Timestamp::ZERO, &path(), class, &config, &mut rng);
            let (sends, _) = drive(
                &mut prober,
                &config,
                &mut rng,
                Timestamp::ZERO,
                Timestamp::from_millis(10_000),
                Duration::from_millis(30),
                |_| true,
            );
            let n = sends.len() as i64;
            assert!(
                (n - expected).abs() <= expected / 5 + 1,
                "{class:?}: {n} probes"
            );
        }
    }

    #[test]
    fn active_path_failure_is_detected_within_a_second() {
        let config = RoutingConfig::default();
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut prober = Prober::new();
            prober.set_class(
                Timestamp::ZERO,
                &path(),
                ProbeClass::Active,
                &config,
                &mut rng,
            );
            let fail_at = Timestamp::from_millis(5_000 + seed * 7);
            let rtt = Duration::from_millis(280);
            let (_, changes) = drive(
                &mut prober,
                &config,
                &mut rng,
                Timestamp::ZERO,
                Timestamp::from_millis(8_000),
                rtt,
                |t| t < fail_at,
            );
            let down: Vec<_> = changes
                .iter()
                .filter(|(_, c)| *c == LivenessChange::WentDown)
                .collect();
            assert_eq!(down.len(), 1, "seed {seed}: {changes:?}");
            let detect = down[0].0.saturating_since(fail_at);
            assert!(
                detect < Duration::from_millis(1000),
                "seed {seed}: {detect:?}"
            );
            assert_eq!(
                prober.stats(&path()).map(|s| s.state()),
                Some(PathState::Dead)
            );
        }
    }

    #[test]
    fn unknown_and_duplicate_replies_are_rejected() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(3);
        let mut prober = Prober::new();
        prober.set_class(
            Timestamp::ZERO,
            &path(),
            ProbeClass::Active,
            &config,
            &mut rng,
        );
        let probes = prober.poll_probes(Timestamp::from_millis(300), &config, &mut rng);
        assert_eq!(probes.len(), 1);
        let id = probes[0].id;
        let now = Timestamp::from_millis(320);
        assert!(prober.handle_reply(now, &path(), id + 1, &config).is_err());
        let (rtt, change) = prober
            .handle_reply(now, &path(), id, &config)
            .expect("pending probe");
        assert_eq!(rtt, Duration::from_millis(20));
        assert_eq!(change, Some(LivenessChange::CameUp));
        assert!(prober.handle_reply(now, &path(), id, &config).is_err());
    }
}
