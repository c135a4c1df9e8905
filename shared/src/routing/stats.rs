//! Probe statistics of one path: smoothed RTT, variance, recent RTT, loss and liveness.
//!
//! Fed by the prober with one call per probe outcome; no clock is read. The smoothed RTT
//! and its variance follow RFC 6298 (gains 1/8 and 1/4). The "recent" RTT is the median of
//! the last few samples: it reacts within a few probes to a real change but ignores a
//! single outlier, which is what hysteresis needs as a second opinion beside the smoothed
//! value. Loss is the share of missed probes among the last `loss_window_probes`.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use super::config::RoutingConfig;
use super::time::Timestamp;

/// Liveness of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathState {
    /// No probe has been answered yet (and not enough have been missed to call it dead).
    Unknown,
    /// The last probe outcome streak is not long enough to call the path dead.
    Alive,
    /// `dead_after_missed_probes` consecutive probes went unanswered.
    Dead,
}

/// A change of liveness reported by [`PathStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessChange {
    /// The path answered after being unknown or dead.
    CameUp,
    /// The path just crossed the missed-probe threshold.
    WentDown,
}

/// Statistics of one probed path.
#[derive(Clone, Debug, Serialize)]
pub struct PathStats {
    /// Smoothed RTT; `None` until the first sample.
    srtt: Option<Duration>,
    /// RTT variation estimate, RFC 6298 `RTTVAR`.
    rttvar: Duration,
    /// Last samples, newest at the back, for the recent (median) RTT.
    #[serde(skip)]
    recent: VecDeque<Duration>,
    /// Outcomes of the last probes by probe id, newest at the back; `true` = missed. Keyed
    /// so that a late reply can correct a probe already counted as missed.
    #[serde(skip)]
    outcomes: VecDeque<(u64, bool)>,
    /// Cached median of `recent`, recomputed per sample (read far more often than written).
    recent_median: Option<Duration>,
    /// Cached count of missed probes in `outcomes`.
    missed_in_window: u32,
    /// Missed probes since the last reply.
    consecutive_missed: u32,
    /// Current liveness.
    state: PathState,
    /// When the last reply arrived, to judge how fresh an "alive" is.
    last_reply: Option<Timestamp>,
    /// Replies received since the path was last (re)born.
    samples: u32,
}

impl Default for PathStats {
    fn default() -> Self {
        PathStats::new()
    }
}

impl PathStats {
    /// Statistics of a path never probed.
    pub fn new() -> Self {
        PathStats {
            srtt: None,
            rttvar: Duration::ZERO,
            recent: VecDeque::new(),
            outcomes: VecDeque::new(),
            recent_median: None,
            missed_in_window: 0,
            consecutive_missed: 0,
            state: PathState::Unknown,
            last_reply: None,
            samples: 0,
        }
    }

    /// Records the reply to probe `probe_id`, which took `rtt`. A reply to a probe already
    /// counted as missed (it arrived after its timeout) corrects the loss record.
    pub fn on_reply(
        &mut self,
        now: Timestamp,
        probe_id: u64,
        rtt: Duration,
        config: &RoutingConfig,
    ) -> Option<LivenessChange> {
        let came_up = self.state != PathState::Alive;
        if self.state == PathState::Dead {
            // The path may come back on different routing; old estimates would only
            // mislead the first comparisons, so start over.
            self.srtt = None;
            self.recent.clear();
            self.recent_median = None;
            self.samples = 0;
            // The outage itself (the run of misses that ended in death) says nothing about
            // the path now: a node that was restarted would otherwise come back with a
            // quarter of its probes "lost" and be passed over for a while. What was lost
            // before the outage stays, so a path that loses often still pays for it.
            while let Some(&(_, true)) = self.outcomes.back() {
                self.outcomes.pop_back();
                self.missed_in_window -= 1;
            }
        }
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = self.rttvar * 3 / 4 + diff / 4;
                self.srtt = Some(srtt * 7 / 8 + rtt / 8);
            }
        }
        self.recent.push_back(rtt);
        while self.recent.len() > config.recent_window_samples as usize {
            self.recent.pop_front();
        }
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort_unstable();
        self.recent_median = sorted.get(sorted.len() / 2).copied();
        match self
            .outcomes
            .iter_mut()
            .rev()
            .find(|(id, _)| *id == probe_id)
        {
            Some(outcome) => {
                if outcome.1 {
                    outcome.1 = false;
                    self.missed_in_window -= 1;
                }
            }
            None => self.push_outcome(probe_id, false, config),
        }
        self.consecutive_missed = 0;
        self.samples = self.samples.saturating_add(1);
        self.last_reply = Some(now);
        self.state = PathState::Alive;
        came_up.then_some(LivenessChange::CameUp)
    }

    /// Records that probe `probe_id` was not answered within its timeout.
    pub fn on_missed(&mut self, probe_id: u64, config: &RoutingConfig) -> Option<LivenessChange> {
        self.push_outcome(probe_id, true, config);
        self.consecutive_missed = self.consecutive_missed.saturating_add(1);
        if self.consecutive_missed >= config.dead_after_missed_probes
            && self.state != PathState::Dead
        {
            let was_alive = self.state == PathState::Alive;
            self.state = PathState::Dead;
            return was_alive.then_some(LivenessChange::WentDown);
        }
        None
    }

    fn push_outcome(&mut self, probe_id: u64, missed: bool, config: &RoutingConfig) {
        self.outcomes.push_back((probe_id, missed));
        self.missed_in_window += u32::from(missed);
        while self.outcomes.len() > config.loss_window_probes as usize {
            if let Some((_, true)) = self.outcomes.pop_front() {
                self.missed_in_window -= 1;
            }
        }
    }

    /// Smoothed RTT (RFC 6298 `SRTT`), once there is a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// RTT variation (RFC 6298 `RTTVAR`).
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Median of the last `recent_window_samples` RTT samples.
    pub fn recent_rtt(&self) -> Option<Duration> {
        self.recent_median
    }

    /// Fraction of the last `loss_window_probes` probes that went unanswered, in `0..=1`.
    pub fn loss(&self) -> f64 {
        if self.outcomes.is_empty() {
            return 0.0;
        }
        f64::from(self.missed_in_window) / self.outcomes.len() as f64
    }

    /// Current liveness.
    pub fn state(&self) -> PathState {
        self.state
    }

    /// True unless the path is known dead.
    pub fn is_dead(&self) -> bool {
        self.state == PathState::Dead
    }

    /// Missed probes since the last reply.
    pub fn consecutive_missed(&self) -> u32 {
        self.consecutive_missed
    }

    /// When the last reply arrived.
    pub fn last_reply(&self) -> Option<Timestamp> {
        self.last_reply
    }

    /// Replies since the path was first probed or last came back from the dead.
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// How long to wait for a reply before counting a probe as missed:
    /// `srtt + 4 * rttvar`, clamped to the configured bounds.
    pub fn probe_timeout(&self, config: &RoutingConfig) -> Duration {
        let min = RoutingConfig::ms(config.min_probe_timeout_ms);
        let max = RoutingConfig::ms(config.max_probe_timeout_ms);
        match self.srtt {
            None => RoutingConfig::ms(config.initial_probe_timeout_ms).clamp(min, max),
            Some(srtt) => (srtt + self.rttvar * 4).clamp(min, max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn first_sample_initialises_like_rfc6298() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        assert_eq!(stats.state(), PathState::Unknown);
        let change = stats.on_reply(Timestamp::ZERO, 1, ms(100), &config);
        assert_eq!(change, Some(LivenessChange::CameUp));
        assert_eq!(stats.srtt(), Some(ms(100)));
        assert_eq!(stats.rttvar(), ms(50));
        stats.on_reply(Timestamp::ZERO, 2, ms(180), &config);
        // srtt = 7/8 * 100 + 1/8 * 180 = 110; rttvar = 3/4 * 50 + 1/4 * 80 = 57.5
        assert_eq!(stats.srtt(), Some(ms(110)));
        assert_eq!(stats.rttvar(), Duration::from_micros(57_500));
    }

    #[test]
    fn recent_is_a_median_that_ignores_one_outlier() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        for (id, rtt) in [50, 51, 500, 49, 50].into_iter().enumerate() {
            stats.on_reply(Timestamp::ZERO, id as u64, ms(rtt), &config);
        }
        assert_eq!(stats.recent_rtt(), Some(ms(50)));
    }

    #[test]
    fn one_lost_probe_never_kills_a_path() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        stats.on_reply(Timestamp::ZERO, 0, ms(20), &config);
        for id in 1..100u64 {
            if id % 2 == 0 {
                assert_eq!(stats.on_missed(id, &config), None);
            } else {
                stats.on_reply(Timestamp::ZERO, id, ms(20), &config);
            }
            assert_eq!(stats.state(), PathState::Alive);
        }
        assert!((stats.loss() - 0.5).abs() < 0.05, "loss {}", stats.loss());
    }

    #[test]
    fn consecutive_misses_kill_and_a_reply_revives() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        stats.on_reply(Timestamp::ZERO, 0, ms(20), &config);
        assert_eq!(stats.on_missed(1, &config), None);
        assert_eq!(stats.on_missed(2, &config), None);
        assert_eq!(stats.on_missed(3, &config), Some(LivenessChange::WentDown));
        assert!(stats.is_dead());
        assert_eq!(stats.on_missed(4, &config), None);
        let change = stats.on_reply(Timestamp::from_millis(5), 5, ms(40), &config);
        assert_eq!(change, Some(LivenessChange::CameUp));
        assert_eq!(stats.srtt(), Some(ms(40)), "estimates restart after death");
        assert_eq!(stats.samples(), 1);
        assert_eq!(stats.loss(), 0.0, "the outage is not counted as loss");
    }

    #[test]
    fn loss_before_an_outage_outlives_it() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        // Every other probe lost, then an outage, then back.
        for id in 0..10 {
            if id % 2 == 0 {
                stats.on_reply(Timestamp::from_millis(id), id, ms(20), &config);
            } else {
                stats.on_missed(id, &config);
            }
        }
        for id in 10..20 {
            stats.on_missed(id, &config);
        }
        assert!(stats.is_dead());
        stats.on_reply(Timestamp::from_millis(20), 20, ms(20), &config);
        // The outage ran from probe 9 (indistinguishable from it) to 19: 4 of 10 lost.
        assert!((stats.loss() - 0.4).abs() < 1e-9, "loss {}", stats.loss());
    }

    #[test]
    fn late_reply_corrects_loss() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        stats.on_reply(Timestamp::ZERO, 0, ms(20), &config);
        stats.on_missed(1, &config);
        assert!(stats.loss() > 0.4);
        stats.on_reply(Timestamp::ZERO, 1, ms(400), &config);
        assert_eq!(stats.loss(), 0.0);
        assert_eq!(stats.consecutive_missed(), 0);
    }

    #[test]
    fn loss_window_is_bounded() {
        let config = RoutingConfig {
            loss_window_probes: 4,
            dead_after_missed_probes: 100,
            ..RoutingConfig::default()
        };
        let mut stats = PathStats::new();
        for id in 0..10 {
            stats.on_missed(id, &config);
        }
        for id in 10..14 {
            stats.on_reply(Timestamp::ZERO, id, ms(10), &config);
        }
        assert_eq!(stats.loss(), 0.0);
    }

    #[test]
    fn probe_timeout_is_clamped() {
        let config = RoutingConfig::default();
        let mut stats = PathStats::new();
        assert_eq!(stats.probe_timeout(&config), ms(1000));
        for id in 0..20 {
            stats.on_reply(Timestamp::ZERO, id, ms(5), &config);
        }
        assert_eq!(stats.probe_timeout(&config), ms(100));
        let mut slow = PathStats::new();
        slow.on_reply(Timestamp::ZERO, 0, ms(900), &config);
        assert_eq!(slow.probe_timeout(&config), ms(2000));
    }
}
