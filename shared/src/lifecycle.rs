//! Process lifecycle: signals, graceful drain, and reconnect backoff.

use std::time::Duration;

use rand::Rng as _;
use tokio_util::sync::CancellationToken;

/// The two ways a node is asked to stop, and the way it is asked to read its config again.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Stop accepting new work and drain what is in flight (SIGTERM).
    pub drain: CancellationToken,
    /// Stop now (SIGINT, or the drain grace period ran out).
    pub now: CancellationToken,
    /// Read the config file again (SIGHUP). A SIGHUP that arrives before the node waits
    /// for it is kept, not lost.
    pub reload: std::sync::Arc<tokio::sync::Notify>,
}

impl Shutdown {
    /// Listens for SIGTERM (drain), SIGINT (exit fast) and SIGHUP (reload). A second
    /// SIGTERM also exits fast.
    pub fn from_signals() -> std::io::Result<Self> {
        let s = Self::default();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            // From here on SIGHUP no longer ends the process (its default).
            let mut hup = signal(SignalKind::hangup())?;
            let task = s.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = hup.recv() => {
                            tracing::info!("SIGHUP: reloading the config");
                            task.reload.notify_one();
                        }
                        _ = term.recv() => {
                            if task.drain.is_cancelled() {
                                tracing::info!("second SIGTERM: exiting now");
                                task.now.cancel();
                            } else {
                                tracing::info!("SIGTERM: draining");
                                task.drain.cancel();
                            }
                        }
                        _ = int.recv() => {
                            tracing::info!("SIGINT: exiting now");
                            task.drain.cancel();
                            task.now.cancel();
                        }
                    }
                }
            });
        }
        Ok(s)
    }
}

/// Accepts the next TCP connection, or returns `None` once `stop` is cancelled.
///
/// Accept errors (usually running out of file descriptors) are logged and retried after a
/// short pause instead of ending the listener: the pause lets connections close and frees
/// descriptors, and keeps a persistent error from spinning a core.
pub async fn accept_until(
    listener: &tokio::net::TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Exponential backoff with full jitter, for every reconnect loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles per failure up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniform in [cap/2, cap] where cap = min(max, base·2^attempt).
    /// Half the cap is kept so retries don't collapse to zero and spin.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let cap = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Forget past failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(101), "{first:?}");
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(5001), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(101));
    }
}
