//! What a link does to traffic ([`LinkProfile`]), the handle that changes it at runtime
//! ([`LinkHandle`]), and what it counted ([`LinkStats`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use crate::vnet::RttMatrix;

/// The largest RTT a profile accepts. Far above any real path; it keeps `Instant + delay`
/// from overflowing whatever a caller passes.
pub const MAX_RTT: Duration = Duration::from_secs(600);

/// The shortest stall a TCP "loss" costs: Linux's minimum retransmission timeout.
pub const MIN_RTO: Duration = Duration::from_millis(200);

/// Latency, jitter and loss of one link, the same in both directions.
///
/// Each direction delays traffic by `rtt / 2`, plus a uniform random offset in
/// `-jitter ..= +jitter` drawn per datagram (UDP) or per chunk read (TCP). `loss` is the
/// probability that one datagram is dropped in one direction; TCP cannot lose bytes, so on
/// TCP it is the probability that a chunk is held back for one retransmission timeout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    /// Round-trip time the link adds; each direction adds half of it.
    pub rtt: Duration,
    /// Half-width of the uniform per-packet jitter on each one-way delay. At most `rtt / 2`,
    /// so nothing arrives before it was sent.
    pub jitter: Duration,
    /// Per-packet, per-direction loss probability in `0.0 ..= 1.0`.
    pub loss: f64,
}

/// Why a [`LinkProfile`] was rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// The loss probability is not a number in `0 ..= 1`.
    #[error("loss must be a fraction in 0..=1, got {0}")]
    Loss(f64),
    /// The jitter exceeds the one-way delay, so a packet could arrive before it left.
    #[error("jitter ({jitter_ms:.3} ms) exceeds the one-way delay ({one_way_ms:.3} ms = rtt / 2)")]
    Jitter {
        /// The jitter asked for, in ms.
        jitter_ms: f64,
        /// Half the RTT, in ms.
        one_way_ms: f64,
    },
    /// The RTT is larger than [`MAX_RTT`].
    #[error("rtt ({rtt_ms:.0} ms) exceeds the maximum of {max_ms} ms")]
    RttTooLarge {
        /// The RTT asked for, in ms.
        rtt_ms: f64,
        /// [`MAX_RTT`] in ms.
        max_ms: u128,
    },
    /// A millisecond figure is negative or not a number.
    #[error("{what} must be a finite number of milliseconds >= 0, got {value}")]
    Millis {
        /// Which figure.
        what: &'static str,
        /// The value given.
        value: f64,
    },
}

impl LinkProfile {
    /// A link that adds `rtt` and nothing else.
    pub fn new(rtt: Duration) -> Self {
        LinkProfile {
            rtt,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }

    /// A validated profile from figures in milliseconds (as the CLI and the matrix give
    /// them).
    pub fn from_ms(rtt_ms: f64, jitter_ms: f64, loss: f64) -> Result<Self, ProfileError> {
        let profile = LinkProfile {
            rtt: millis("rtt", rtt_ms)?,
            jitter: millis("jitter", jitter_ms)?,
            loss,
        };
        profile.validate()?;
        Ok(profile)
    }

    /// The profile of the link between regions `a` and `b` of a matrix: its measured RTT,
    /// with the given jitter (as a fraction of the one-way delay) and loss.
    pub fn between(
        matrix: &RttMatrix,
        a: usize,
        b: usize,
        jitter_fraction: f64,
        loss: f64,
    ) -> Result<Self, ProfileError> {
        let rtt_ms = matrix.rtt_ms(a, b);
        Self::from_ms(rtt_ms, rtt_ms / 2.0 * jitter_fraction, loss)
    }

    /// Returns the profile with this jitter.
    pub fn with_jitter(self, jitter: Duration) -> Self {
        LinkProfile { jitter, ..self }
    }

    /// Returns the profile with this loss probability.
    pub fn with_loss(self, loss: f64) -> Self {
        LinkProfile { loss, ..self }
    }

    /// Checks the invariants every link relies on.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(ProfileError::Loss(self.loss));
        }
        if self.rtt > MAX_RTT {
            return Err(ProfileError::RttTooLarge {
                rtt_ms: self.rtt.as_secs_f64() * 1e3,
                max_ms: MAX_RTT.as_millis(),
            });
        }
        if self.jitter > self.rtt / 2 {
            return Err(ProfileError::Jitter {
                jitter_ms: self.jitter.as_secs_f64() * 1e3,
                one_way_ms: self.rtt.as_secs_f64() * 1e3 / 2.0,
            });
        }
        Ok(())
    }

    /// One draw of the one-way delay: `rtt / 2 ± jitter`.
    pub(crate) fn one_way(&self, rng: &mut impl Rng) -> Duration {
        let base = self.rtt / 2;
        if self.jitter.is_zero() {
            return base;
        }
        let offset = self.jitter.as_secs_f64() * rng.random_range(-1.0..=1.0);
        Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0))
    }

    /// Whether this packet is lost (one draw).
    pub(crate) fn lose(&self, rng: &mut impl Rng) -> bool {
        self.loss > 0.0 && rng.random_bool(self.loss)
    }

    /// What a lost TCP segment costs: one retransmission timeout, `max(200 ms, 2 × rtt)`.
    pub fn rto(&self) -> Duration {
        (self.rtt * 2).max(MIN_RTO)
    }
}

fn millis(what: &'static str, value: f64) -> Result<Duration, ProfileError> {
    if !value.is_finite() || value < 0.0 {
        return Err(ProfileError::Millis { what, value });
    }
    // Beyond MAX_RTT validate() rejects it; clamp first so the conversion cannot panic.
    Ok(Duration::from_secs_f64(
        (value / 1e3).min(MAX_RTT.as_secs_f64() * 2.0),
    ))
}

/// What a running link does right now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkState {
    /// The current profile.
    pub profile: LinkProfile,
    /// A cut link is a black hole: UDP datagrams are dropped, TCP bytes are held until it
    /// is restored (as TCP would keep retransmitting across a partition).
    pub cut: bool,
}

/// Counters of one link, both directions together.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_cut: AtomicU64,
    pub dropped_overflow: AtomicU64,
    pub stalls: AtomicU64,
    pub connections: AtomicU64,
    pub connect_failures: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of a link's counters, both directions together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// UDP datagrams or TCP chunks delivered.
    pub packets: u64,
    /// Payload bytes delivered.
    pub bytes: u64,
    /// UDP datagrams dropped by the loss draw.
    pub dropped_loss: u64,
    /// UDP datagrams dropped because the link was cut.
    pub dropped_cut: u64,
    /// UDP datagrams dropped because a bounded queue or the association table was full,
    /// or their association had expired.
    pub dropped_overflow: u64,
    /// TCP chunks held back one RTO by the loss draw.
    pub stalls: u64,
    /// TCP connections accepted, or UDP associations opened.
    pub connections: u64,
    /// TCP connections to the target that failed.
    pub connect_failures: u64,
}

/// A cheap, clonable handle on a running link: read or change its profile, cut it,
/// restore it. Changes apply to packets and chunks that enter the link afterwards;
/// what is already in flight keeps its delivery time (except that a cut drops in-flight
/// UDP datagrams and holds in-flight TCP bytes).
#[derive(Clone, Debug)]
pub struct LinkHandle {
    state: Arc<watch::Sender<LinkState>>,
    initial: LinkProfile,
    counters: Arc<Counters>,
}

impl LinkHandle {
    /// A handle for a link that starts with `profile` (validated).
    pub(crate) fn new(profile: LinkProfile) -> Result<Self, ProfileError> {
        profile.validate()?;
        let (state, _) = watch::channel(LinkState {
            profile,
            cut: false,
        });
        Ok(LinkHandle {
            state: Arc::new(state),
            initial: profile,
            counters: Arc::default(),
        })
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    /// The current profile.
    pub fn profile(&self) -> LinkProfile {
        self.state.borrow().profile
    }

    /// Replaces the profile (slower, lossier, …). The cut state is unchanged.
    pub fn set_profile(&self, profile: LinkProfile) -> Result<(), ProfileError> {
        profile.validate()?;
        self.state.send_modify(|s| s.profile = profile);
        Ok(())
    }

    /// Changes only the RTT, keeping jitter and loss.
    pub fn set_rtt(&self, rtt: Duration) -> Result<(), ProfileError> {
        self.set_profile(LinkProfile {
            rtt,
            ..self.profile()
        })
    }

    /// Changes only the loss probability.
    pub fn set_loss(&self, loss: f64) -> Result<(), ProfileError> {
        self.set_profile(self.profile().with_loss(loss))
    }

    /// Cuts the link: nothing crosses until [`restore`](Self::restore) or
    /// [`uncut`](Self::uncut).
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cut = true);
    }

    /// Ends a cut, keeping the current profile.
    pub fn uncut(&self) {
        self.state.send_modify(|s| s.cut = false);
    }

    /// Ends any cut and puts back the profile the link started with.
    pub fn restore(&self) {
        let initial = self.initial;
        self.state.send_modify(|s| {
            s.cut = false;
            s.profile = initial;
        });
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.state.borrow().cut
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LinkStats {
        let c = &*self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            packets: get(&c.packets),
            bytes: get(&c.bytes),
            dropped_loss: get(&c.dropped_loss),
            dropped_cut: get(&c.dropped_cut),
            dropped_overflow: get(&c.dropped_overflow),
            stalls: get(&c.stalls),
            connections: get(&c.connections),
            connect_failures: get(&c.connect_failures),
        }
    }

    /// A receiver that sees every change (to wait for the end of a cut).
    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn validation_names_the_problem() {
        let ms = Duration::from_millis;
        assert!(LinkProfile::new(ms(100)).validate().is_ok());
        assert_eq!(
            LinkProfile::new(ms(100)).with_loss(1.5).validate(),
            Err(ProfileError::Loss(1.5))
        );
        assert!(
            LinkProfile::new(ms(100))
                .with_loss(f64::NAN)
                .validate()
                .is_err()
        );
        let err = LinkProfile::new(ms(40))
            .with_jitter(ms(30))
            .validate()
            .map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("jitter (30.000 ms) exceeds the one-way delay (20.000 ms = rtt / 2)".into())
        );
        assert!(matches!(
            LinkProfile::new(Duration::from_secs(3600)).validate(),
            Err(ProfileError::RttTooLarge { .. })
        ));
        assert!(matches!(
            LinkProfile::from_ms(-1.0, 0.0, 0.0),
            Err(ProfileError::Millis { what: "rtt", .. })
        ));
        assert!(LinkProfile::from_ms(f64::INFINITY, 0.0, 0.0).is_err());
        assert!(LinkProfile::from_ms(1e300, 0.0, 0.0).is_err());
        assert!(LinkHandle::new(LinkProfile::new(ms(1)).with_loss(-0.1)).is_err());
    }

    #[test]
    fn delays_stay_within_the_jitter_band() {
        let p = LinkProfile::from_ms(100.0, 20.0, 0.0).expect("valid");
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<f64> = (0..10_000)
            .map(|_| p.one_way(&mut rng).as_secs_f64() * 1e3)
            .collect();
        assert!(draws.iter().all(|d| (30.0..=70.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 50.0).abs() < 0.5, "mean {mean}");
        assert_eq!(p.rto(), Duration::from_millis(200));
        assert_eq!(
            LinkProfile::from_ms(300.0, 0.0, 0.0).map(|p| p.rto()),
            Ok(Duration::from_millis(600))
        );
    }

    #[test]
    fn handle_changes_cuts_and_restores() {
        let ms = Duration::from_millis;
        let h = LinkHandle::new(LinkProfile::new(ms(100))).expect("valid");
        let h2 = h.clone();
        h2.set_rtt(ms(300)).expect("valid");
        h2.cut();
        assert_eq!(h.profile().rtt, ms(300));
        assert!(h.is_cut());
        assert!(h.set_loss(2.0).is_err());
        h.restore();
        assert_eq!(
            h2.state(),
            LinkState {
                profile: LinkProfile::new(ms(100)),
                cut: false
            }
        );
    }
}
