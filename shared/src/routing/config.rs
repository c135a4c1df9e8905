//! Routing configuration: probe cadence, liveness, cost, hysteresis and gossip knobs.
//!
//! Every key carries its unit. Defaults are chosen for a mesh of tens to a hundred nodes
//! spread over continents (RTTs of 10–300 ms); each field documents its default and the
//! trade-off of changing it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Knobs of the routing core. Build with `RoutingConfig::default()` and adjust, or
/// deserialize from the `[routing]` section of a node config; call
/// [`RoutingConfig::validate`] (the [`Router`](super::Router) constructor does) before use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Probe interval of the path currently carrying traffic to a destination. Default 250.
    /// Together with `dead_after_missed_probes` it bounds failure detection (~1 s).
    pub active_probe_interval_ms: u64,
    /// Probe interval of standby paths (the direct path and the best alternatives to each
    /// destination), which failover jumps to. Default 1000.
    pub standby_probe_interval_ms: u64,
    /// Probe interval of every other direct link to a peer; these measurements feed the
    /// link-state gossip. Default 5000. Lower it for fresher mesh views at O(N) more probes.
    pub idle_probe_interval_ms: u64,
    /// Probe interval of an active or standby path that has just missed a probe, so a real
    /// failure is confirmed quickly. Default 100.
    pub suspect_probe_interval_ms: u64,
    /// A path is declared dead after this many consecutive missed probes; never on one lost
    /// packet. Default 3. Higher values survive bursty loss but detect failures later.
    pub dead_after_missed_probes: u32,
    /// Lower bound of the probe timeout (`srtt + 4 * rttvar`, clamped). Default 100.
    pub min_probe_timeout_ms: u64,
    /// Upper bound of the probe timeout. Default 2000.
    pub max_probe_timeout_ms: u64,
    /// Probe timeout before a path has any RTT sample. Default 1000.
    pub initial_probe_timeout_ms: u64,
    /// Number of most recent probes over which loss is computed (1..=256). Default 32.
    pub loss_window_probes: u32,
    /// Number of most recent RTT samples whose median is the "recent" RTT (1..=64). Default 5.
    pub recent_window_samples: u32,
    /// Cost of loss, in ms of RTT per unit of loss fraction: `cost = srtt + loss_penalty_ms *
    /// loss`. Default 1000, i.e. 1 % loss costs as much as 10 ms of RTT.
    pub loss_penalty_ms: u64,
    /// Maximum number of relays on a path (0..=2). Default 2.
    pub max_relays: u32,
    /// How often routes are re-evaluated when nothing urgent happens. A dead active path
    /// triggers an immediate evaluation. Default 500.
    pub route_eval_interval_ms: u64,
    /// A better path must be cheaper by at least this many ms... Default 10.
    pub switch_min_gain_ms: u64,
    /// ...and by at least this percentage of the current cost, on both the smoothed and the
    /// recent measure. Default 10.
    pub switch_min_gain_percent: u64,
    /// ...continuously for this long. Default 5000.
    pub switch_sustain_ms: u64,
    /// A random extra delay in `0..=switch_jitter_ms` is added to the sustain time, so nodes
    /// that see the same improvement do not move their flows at the same instant. Default 2000.
    pub switch_jitter_ms: u64,
    /// After any switch, no performance-driven switch happens for this long (failover still
    /// does). Default 30000.
    pub min_dwell_ms: u64,
    /// For this long after a destination first gets a route, the router follows the best
    /// estimate without hysteresis, while the mesh view fills in. Default 15000.
    pub settle_ms: u64,
    /// During settling, a candidate must beat the current route by this percentage. Default 2.
    pub settle_min_gain_percent: u64,
    /// ...and by at least this many ms, so equal paths a fraction of a millisecond apart
    /// (two relays in one data centre) don't trade places on noise. Default 1.
    pub settle_min_gain_ms: u64,
    /// A path's end-to-end measurement is trusted for a performance switch after this many
    /// replies. Default 3.
    pub min_samples_for_switch: u32,
    /// Number of alternative paths per destination kept warm at the standby cadence, besides
    /// the direct path. Default 2.
    pub standby_paths: u32,
    /// Period of gossip rounds, which push freshly learned link-state deltas. Default 200.
    pub gossip_interval_ms: u64,
    /// Peers each gossip round pushes to. Default 3.
    pub gossip_fanout: u32,
    /// Rounds a fresh delta is pushed before it goes quiet (anti-entropy repairs the rest).
    /// Default 1.
    pub gossip_retransmits: u32,
    /// Period of anti-entropy: a version digest sent to one random peer, which answers with
    /// what the sender lacks. Default 2000.
    pub anti_entropy_interval_ms: u64,
    /// A direct link's measurement is re-published when its smoothed or recent RTT moved by
    /// at least this many ms... Default 2.
    pub publish_min_change_ms: u64,
    /// ...and this percentage since last published, or its loss moved by
    /// `publish_min_loss_change_percent` points, or its liveness changed. Default 5.
    pub publish_min_change_percent: u64,
    /// See `publish_min_change_percent`. Default 2.
    pub publish_min_loss_change_percent: u64,
    /// Largest gossip datagram the router emits; updates are packed up to this size.
    /// Default 1200 (safe for QUIC-sized paths).
    pub max_datagram_bytes: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            active_probe_interval_ms: 250,
            standby_probe_interval_ms: 1000,
            idle_probe_interval_ms: 5000,
            suspect_probe_interval_ms: 100,
            dead_after_missed_probes: 3,
            min_probe_timeout_ms: 100,
            max_probe_timeout_ms: 2000,
            initial_probe_timeout_ms: 1000,
            loss_window_probes: 32,
            recent_window_samples: 5,
            loss_penalty_ms: 1000,
            max_relays: 2,
            route_eval_interval_ms: 500,
            switch_min_gain_ms: 10,
            switch_min_gain_percent: 10,
            switch_sustain_ms: 5000,
            switch_jitter_ms: 2000,
            min_dwell_ms: 30_000,
            settle_ms: 15_000,
            settle_min_gain_percent: 2,
            settle_min_gain_ms: 1,
            min_samples_for_switch: 3,
            standby_paths: 2,
            gossip_interval_ms: 200,
            gossip_fanout: 3,
            gossip_retransmits: 1,
            anti_entropy_interval_ms: 2000,
            publish_min_change_ms: 2,
            publish_min_change_percent: 5,
            publish_min_loss_change_percent: 2,
            max_datagram_bytes: 1200,
        }
    }
}

/// Why a [`RoutingConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value outside its allowed range.
    #[error("routing.{key}: {reason}")]
    Invalid {
        /// The offending key, as spelled in the config file.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn check(ok: bool, key: &'static str, reason: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        })
    }
}

impl RoutingConfig {
    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("active_probe_interval_ms", self.active_probe_interval_ms),
            ("standby_probe_interval_ms", self.standby_probe_interval_ms),
            ("idle_probe_interval_ms", self.idle_probe_interval_ms),
            ("suspect_probe_interval_ms", self.suspect_probe_interval_ms),
            ("min_probe_timeout_ms", self.min_probe_timeout_ms),
            ("initial_probe_timeout_ms", self.initial_probe_timeout_ms),
            ("route_eval_interval_ms", self.route_eval_interval_ms),
            ("gossip_interval_ms", self.gossip_interval_ms),
            ("anti_entropy_interval_ms", self.anti_entropy_interval_ms),
        ];
        for (key, value) in positive {
            check(value > 0, key, "must be greater than 0")?;
        }
        check(
            self.active_probe_interval_ms <= self.standby_probe_interval_ms
                && self.standby_probe_interval_ms <= self.idle_probe_interval_ms,
            "standby_probe_interval_ms",
            "probe intervals must satisfy active <= standby <= idle",
        )?;
        check(
            self.dead_after_missed_probes >= 2,
            "dead_after_missed_probes",
            "must be at least 2: a single lost probe never kills a path",
        )?;
        check(
            self.max_probe_timeout_ms >= self.min_probe_timeout_ms,
            "max_probe_timeout_ms",
            "must be at least min_probe_timeout_ms",
        )?;
        check(
            (1..=256).contains(&self.loss_window_probes),
            "loss_window_probes",
            "must be in 1..=256",
        )?;
        check(
            (1..=64).contains(&self.recent_window_samples),
            "recent_window_samples",
            "must be in 1..=64",
        )?;
        check(self.max_relays <= 2, "max_relays", "must be 0, 1 or 2")?;
        check(
            self.switch_min_gain_percent < 100,
            "switch_min_gain_percent",
            "must be below 100",
        )?;
        check(
            self.settle_min_gain_percent < 100,
            "settle_min_gain_percent",
            "must be below 100",
        )?;
        check(
            self.gossip_fanout >= 1,
            "gossip_fanout",
            "must be at least 1",
        )?;
        check(
            self.max_datagram_bytes >= 256,
            "max_datagram_bytes",
            "must be at least 256",
        )?;
        Ok(())
    }

    pub(crate) fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RoutingConfig::default().validate(), Ok(()));
    }

    type Edit = fn(&mut RoutingConfig);

    #[test]
    fn invalid_values_name_the_key() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                |c| c.active_probe_interval_ms = 0,
                "active_probe_interval_ms",
            ),
            (
                |c| c.dead_after_missed_probes = 1,
                "dead_after_missed_probes",
            ),
            (|c| c.max_relays = 3, "max_relays"),
            (|c| c.loss_window_probes = 0, "loss_window_probes"),
            (
                |c| c.standby_probe_interval_ms = 10,
                "standby_probe_interval_ms",
            ),
            (|c| c.max_datagram_bytes = 10, "max_datagram_bytes"),
        ];
        for (edit, key) in cases {
            let mut config = RoutingConfig::default();
            edit(&mut config);
            let err = config.validate().expect_err(key);
            assert!(
                err.to_string().starts_with(&format!("routing.{key}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn deserializes_partial_and_rejects_unknown_keys() {
        let config: RoutingConfig =
            serde_json::from_str(r#"{"min_dwell_ms": 1000}"#).expect("partial config");
        assert_eq!(config.min_dwell_ms, 1000);
        assert_eq!(config.active_probe_interval_ms, 250);
        assert!(serde_json::from_str::<RoutingConfig>(r#"{"dwell": 1}"#).is_err());
    }
}
