//! The per-destination route state machine: hysteresis, dwell, jitter and failover.
//!
//! Rules, in order of precedence, applied at every evaluation:
//!
//! 1. **No route yet** — take the cheapest candidate ([`SwitchReason::Initial`]).
//! 2. **Current path dead** (probes or gossip say so) — leave it at once, for the
//!    cheapest *verified* candidate (answered its own end-to-end probes recently) that
//!    shares no relay and no first link with the dead path; failing that any verified one,
//!    then any candidate ([`SwitchReason::Failover`]). No dwell or sustain applies.
//! 3. **Settling** — for `settle_ms` after the destination first got a route, follow the
//!    best candidate whenever it is `settle_min_gain_percent` and `settle_min_gain_ms` cheaper
//!    ([`SwitchReason::Settling`]): no flow has had time to care yet, and the mesh view is
//!    still filling in.
//! 4. **Clearly better** — a verified candidate must beat the current path by at least
//!    `switch_min_gain_ms` *and* `switch_min_gain_percent`, on the smoothed *and* the
//!    recent measure, continuously for `switch_sustain_ms` plus a random jitter in
//!    `0..=switch_jitter_ms`, and at least `min_dwell_ms` after the last performance switch
//!    or failover (an initial or settling choice starts no dwell)
//!    ([`SwitchReason::Better`]).

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;

use super::config::RoutingConfig;
use super::select::PathCost;
use super::time::Timestamp;
use super::wire::{NodeKey, Path};

/// Why a route changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SwitchReason {
    /// First route to the destination.
    Initial,
    /// Early adjustment while the mesh view fills in.
    Settling,
    /// The previous path died.
    Failover,
    /// A clearly and durably better path was adopted.
    Better,
}

/// The route currently chosen for a destination.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(bound(serialize = "N: NodeKey"))]
pub struct ChosenRoute<N> {
    /// The destination (connector).
    pub destination: N,
    /// The path, this node first.
    pub path: Path<N>,
    /// Its latest cost (measured end to end once probed, else estimated from link state).
    pub cost: PathCost,
    /// When this path was chosen.
    pub since: Timestamp,
    /// Why it was chosen.
    pub reason: SwitchReason,
}

/// A route change, for logs, metrics and the mesh socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(bound(serialize = "N: NodeKey"))]
pub struct RouteEvent<N> {
    /// When it happened.
    pub at: Timestamp,
    /// The destination whose route changed.
    pub destination: N,
    /// The previous path, if any.
    pub old: Option<Path<N>>,
    /// The new path; `None` when no path to the destination is left.
    pub new: Option<Path<N>>,
    /// Why.
    pub reason: SwitchReason,
}

/// A path the route could move to.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<N> {
    /// The path.
    pub path: Path<N>,
    /// Its cost: measured end to end if `verified`, else estimated from link state.
    pub cost: PathCost,
    /// The path answered enough of its own end-to-end probes, recently, with no miss
    /// outstanding.
    pub verified: bool,
}

/// What the caller knows about the current path at evaluation time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurrentStatus {
    /// The path is dead (its probes, or a link on it).
    pub dead: bool,
    /// Its current cost, if known.
    pub cost: Option<PathCost>,
}

/// Route selection state for one destination.
#[derive(Clone, Debug)]
pub struct DestinationRoute<N> {
    destination: N,
    current: Option<ChosenRoute<N>>,
    /// When the destination first got a route: the settling window starts there.
    first_routed_at: Option<Timestamp>,
    /// Since when some verified candidate has been clearly better.
    challenger_since: Option<Timestamp>,
    /// Sustain time required of the current challenger streak, jitter included.
    required_sustain: Duration,
    /// Last performance switch or failover, for the dwell rule.
    last_switch: Option<Timestamp>,
}

impl<N: NodeKey> DestinationRoute<N> {
    /// No route yet to `destination`.
    pub fn new(destination: N) -> Self {
        DestinationRoute {
            destination,
            current: None,
            first_routed_at: None,
            challenger_since: None,
            required_sustain: Duration::ZERO,
            last_switch: None,
        }
    }

    /// The destination.
    pub fn destination(&self) -> &N {
        &self.destination
    }

    /// The current route.
    pub fn current(&self) -> Option<&ChosenRoute<N>> {
        self.current.as_ref()
    }

    /// Applies the rules in the module docs. `candidates` must exclude dead paths; they
    /// need not be sorted. Returns the change, if any.
    pub fn evaluate(
        &mut self,
        now: Timestamp,
        status: CurrentStatus,
        candidates: &[Candidate<N>],
        config: &RoutingConfig,
        rng: &mut StdRng,
    ) -> Option<RouteEvent<N>> {
        let mut sorted: Vec<&Candidate<N>> = candidates.iter().collect();
        sorted.sort_by(|a, b| a.cost.smoothed_ms.total_cmp(&b.cost.smoothed_ms));
        let Some(current) = self.current.as_mut() else {
            let best = sorted.first()?;
            self.first_routed_at.get_or_insert(now);
            return Some(self.switch(now, best, SwitchReason::Initial));
        };
        let others: Vec<&Candidate<N>> = sorted
            .into_iter()
            .filter(|c| c.path != current.path)
            .collect();

        if status.dead {
            let dead = current.path.clone();
            let disjoint = |c: &&&Candidate<N>| {
                !c.path.relays().iter().any(|r| dead.relays().contains(r))
                    && (dead.is_direct() || c.path.first_hop() != dead.first_hop())
            };
            let pick = others
                .iter()
                .filter(|c| c.verified)
                .find(disjoint)
                .or_else(|| others.iter().find(|c| c.verified))
                .or_else(|| others.iter().find(disjoint))
                .or_else(|| others.first())
                .copied();
            return match pick {
                Some(next) => Some(self.switch(now, next, SwitchReason::Failover)),
                None => {
                    self.current = None;
                    self.challenger_since = None;
                    self.last_switch = Some(now);
                    Some(RouteEvent {
                        at: now,
                        destination: self.destination.clone(),
                        old: Some(dead),
                        new: None,
                        reason: SwitchReason::Failover,
                    })
                }
            };
        }

        if let Some(cost) = status.cost {
            current.cost = cost;
        }
        let current_cost = current.cost;
        let settling = self
            .first_routed_at
            .is_some_and(|t| now.saturating_since(t) < RoutingConfig::ms(config.settle_ms));
        if settling {
            let factor = 1.0 - config.settle_min_gain_percent as f64 / 100.0;
            if let Some(best) = others.first() {
                let gain = current_cost.smoothed_ms - best.cost.smoothed_ms;
                if best.cost.smoothed_ms < current_cost.smoothed_ms * factor
                    && gain >= config.settle_min_gain_ms as f64
                {
                    return Some(self.switch(now, best, SwitchReason::Settling));
                }
            }
            self.challenger_since = None;
            return None;
        }

        let challenger = others.iter().find(|c| c.verified).filter(|c| {
            c.cost.clearly_beats(
                &current_cost,
                config.switch_min_gain_ms,
                config.switch_min_gain_percent,
            )
        });
        let Some(challenger) = challenger else {
            self.challenger_since = None;
            return None;
        };
        let since = match self.challenger_since {
            Some(since) => since,
            None => {
                let jitter =
                    RoutingConfig::ms(config.switch_jitter_ms).mul_f64(rng.random_range(0.0..=1.0));
                self.required_sustain = RoutingConfig::ms(config.switch_sustain_ms) + jitter;
                self.challenger_since = Some(now);
                now
            }
        };
        let sustained = now.saturating_since(since) >= self.required_sustain;
        let dwelled = self
            .last_switch
            .is_none_or(|t| now.saturating_since(t) >= RoutingConfig::ms(config.min_dwell_ms));
        if sustained && dwelled {
            let challenger = *challenger;
            return Some(self.switch(now, challenger, SwitchReason::Better));
        }
        None
    }

    fn switch(
        &mut self,
        now: Timestamp,
        next: &Candidate<N>,
        reason: SwitchReason,
    ) -> RouteEvent<N> {
        let old = self.current.take().map(|c| c.path);
        self.current = Some(ChosenRoute {
            destination: self.destination.clone(),
            path: next.path.clone(),
            cost: next.cost,
            since: now,
            reason,
        });
        self.challenger_since = None;
        // The dwell protects flows from being moved twice in a row; a first choice or a
        // settling adjustment, made before flows had time to care, doesn't start it.
        if matches!(reason, SwitchReason::Better | SwitchReason::Failover) {
            self.last_switch = Some(now);
        }
        RouteEvent {
            at: now,
            destination: self.destination.clone(),
            old,
            new: Some(next.path.clone()),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::wire::PeerIndex;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn path(nodes: &[u16]) -> Path<PeerIndex> {
        Path::new(nodes.iter().map(|&n| PeerIndex(n)).collect()).expect("valid path")
    }

    fn cost(smoothed: u64, recent: u64) -> PathCost {
        PathCost::new(
            Duration::from_millis(smoothed),
            Duration::from_millis(recent),
            0.0,
            &RoutingConfig::default(),
        )
    }

    fn cand(nodes: &[u16], ms: u64) -> Candidate<PeerIndex> {
        Candidate {
            path: path(nodes),
            cost: cost(ms, ms),
            verified: true,
        }
    }

    fn alive(ms: u64) -> CurrentStatus {
        CurrentStatus {
            dead: false,
            cost: Some(cost(ms, ms)),
        }
    }

    /// A route to 9 established on the direct path at t = 0, settled.
    fn established(config: &RoutingConfig, rng: &mut StdRng) -> DestinationRoute<PeerIndex> {
        let mut route = DestinationRoute::new(PeerIndex(9));
        let event = route.evaluate(
            Timestamp::ZERO,
            alive(200),
            &[cand(&[0, 9], 200)],
            config,
            rng,
        );
        assert_eq!(event.map(|e| e.reason), Some(SwitchReason::Initial));
        route
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn better_path_needs_sustain_and_dwell() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut route = established(&config, &mut rng);
        let cands = [cand(&[0, 9], 200), cand(&[0, 3, 9], 150)];
        let mut switched_at = None;
        for t in (20_000..60_000).step_by(500) {
            if let Some(e) = route.evaluate(at(t), alive(200), &cands, &config, &mut rng) {
                assert_eq!(e.reason, SwitchReason::Better);
                switched_at = Some(t);
                break;
            }
        }
        // The initial choice starts no dwell: sustain 5–7 s counted from 20 s.
        let first = switched_at.expect("switches eventually");
        assert!((25_000..=27_000).contains(&first), "switched at {first}");

        // That switch does start the 30 s dwell, however much better the next path is.
        let cands = [
            cand(&[0, 9], 200),
            cand(&[0, 3, 9], 150),
            cand(&[0, 4, 9], 100),
        ];
        let mut second = None;
        for t in (first + 500..first + 60_000).step_by(500) {
            if let Some(e) = route.evaluate(at(t), alive(150), &cands, &config, &mut rng) {
                assert_eq!(e.reason, SwitchReason::Better);
                second = Some(t);
                break;
            }
        }
        let second = second.expect("switches again eventually");
        assert!(
            second - first >= config.min_dwell_ms,
            "{first} then {second}"
        );
    }

    #[test]
    fn failover_prefers_a_verified_disjoint_path() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut route = DestinationRoute::new(PeerIndex(9));
        route.evaluate(
            at(0),
            alive(100),
            &[cand(&[0, 3, 9], 100)],
            &config,
            &mut rng,
        );
        let cands = [
            cand(&[0, 3, 4, 9], 110), // shares relay 3
            Candidate {
                verified: false,
                ..cand(&[0, 5, 9], 115)
            }, // not verified
            cand(&[0, 6, 9], 160),
            cand(&[0, 9], 250),
        ];
        let event = route
            .evaluate(
                at(100),
                CurrentStatus {
                    dead: true,
                    cost: None,
                },
                &cands,
                &config,
                &mut rng,
            )
            .expect("fails over");
        assert_eq!(event.reason, SwitchReason::Failover);
        assert_eq!(event.new, Some(path(&[0, 6, 9])));
        // Nothing left: the route is withdrawn.
        let event = route
            .evaluate(
                at(200),
                CurrentStatus {
                    dead: true,
                    cost: None,
                },
                &[],
                &config,
                &mut rng,
            )
            .expect("withdraws");
        assert_eq!(event.new, None);
        assert!(route.current().is_none());
    }

    #[test]
    fn settling_follows_the_best_estimate() {
        let config = RoutingConfig::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut route = established(&config, &mut rng);
        let est = Candidate {
            verified: false,
            ..cand(&[0, 3, 9], 190)
        };
        let e = route.evaluate(at(2000), alive(200), &[est], &config, &mut rng);
        assert_eq!(e.map(|e| e.reason), Some(SwitchReason::Settling));
    }

    proptest! {
        /// Hysteresis: whatever the sequence of candidate costs, a performance switch only
        /// happens to a verified candidate that clearly beats the current path on both
        /// measures, never within the dwell time of the previous switch, and never twice
        /// within `min_dwell_ms`.
        #[test]
        fn performance_switches_are_clear_and_spaced(
            seed in any::<u64>(),
            steps in proptest::collection::vec((150u64..260, 150u64..260, 150u64..260, any::<bool>()), 1..300),
        ) {
            let config = RoutingConfig::default();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut route = established(&config, &mut rng);
            let mut last_switch: Option<u64> = None;
            for (i, (direct, relay_s, relay_r, verified)) in steps.into_iter().enumerate() {
                let t = 16_000 + i as u64 * 500;
                let relay = Candidate { path: path(&[0, 3, 9]), cost: cost(relay_s, relay_r), verified };
                let direct_c = cand(&[0, 9], direct);
                let on_direct = route.current().is_some_and(|c| c.path.is_direct());
                let cur = if on_direct { direct_c.cost } else { relay.cost };
                let status = CurrentStatus { dead: false, cost: Some(cur) };
                if let Some(e) = route.evaluate(at(t), status, &[direct_c.clone(), relay.clone()], &config, &mut rng) {
                    prop_assert_eq!(e.reason, SwitchReason::Better);
                    prop_assert!(last_switch.is_none_or(|l| t - l >= config.min_dwell_ms));
                    let winner = if on_direct { &relay } else { &direct_c };
                    prop_assert!(winner.verified);
                    prop_assert!(winner.cost.clearly_beats(&cur, 10, 10));
                    last_switch = Some(t);
                }
            }
        }
    }
}
