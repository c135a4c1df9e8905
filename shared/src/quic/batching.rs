//! The runtime quinn's drivers run on: tokio's, except that a driver woken again shortly
//! after it went to sleep first lets the tasks already runnable on its thread run.
//!
//! Every write to a QUIC stream wakes the connection's driver, which then sends what is
//! pending; every datagram the endpoint driver hands to a connection wakes that
//! connection's driver. tokio's multi-threaded scheduler runs a task woken by another task
//! next, on the same thread (its "LIFO slot"). Under load that gave each request written to
//! the tunnel its own run of the driver and its own datagram, where a driver that waited its
//! turn packs the requests of many connections into one datagram and one `sendmsg`.
//!
//! So a driver woken within [`BUSY`] of its last run yields once ([`tokio::task::yield_now`],
//! which tokio resumes after the tasks runnable at that moment). A driver woken after a
//! quiet spell runs at once, so a single flow, such as one websocket's echo, does not pay an
//! extra trip through the scheduler at every hop.
//!
//! Measured with `benchmarks/ab.sh` on the 2-core benchmark machine against tokio's runtime
//! as it is (`docs/benchmarks.md`, 2026-12-07, evening): the datagrams per HTTP/1.1 request
//! through the edge's mesh socket went from 1.88 to 0.87 (HTTP/2: 1.47 to 0.60), and the
//! edge's and connector's CPU per HTTP/1.1 request from 166 to 125 µs. A yield after every
//! wake-up saved as much under load but added 77–92 µs to the websocket echo's median;
//! this moved it by −55 to +32 µs in four runs, within the noise.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};

/// A wake-up this soon after a driver's last run is taken as a sign of load: the driver
/// yields before it runs. 50 and 100 µs did alike under load; the shorter window defers
/// fewer of a lone flow's wake-ups.
pub const BUSY: Duration = Duration::from_micros(50);

/// tokio's runtime, with quinn's drivers run as [`Deferred`] (see the module).
#[derive(Debug)]
pub struct BatchingRuntime;

impl Runtime for BatchingRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: BoxFuture) {
        tokio::spawn(Deferred::new(future, BUSY));
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        TokioRuntime.wrap_udp_socket(t)
    }
}

/// A quinn driver, or the yield before it runs.
type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A driver that yields once when it is woken within `busy` of its last run.
struct Deferred {
    driver: BoxFuture,
    busy: Duration,
    /// When the driver last returned `Pending`; taken by the next poll.
    slept_at: Option<Instant>,
    /// The yield in progress.
    yielding: Option<BoxFuture>,
}

impl Deferred {
    fn new(driver: BoxFuture, busy: Duration) -> Self {
        Deferred {
            driver,
            busy,
            slept_at: None,
            yielding: None,
        }
    }
}

impl Future for Deferred {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(at) = self.slept_at.take()
            && at.elapsed() < self.busy
        {
            self.yielding = Some(Box::pin(tokio::task::yield_now()));
        }
        if let Some(y) = self.yielding.as_mut() {
            ready!(y.as_mut().poll(cx));
            self.yielding = None;
        }
        let polled = self.driver.as_mut().poll(cx);
        if polled.is_pending() {
            self.slept_at = Some(Instant::now());
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Notify;

    use super::*;

    /// On one worker, a task wakes a sleeping driver while another task is already
    /// queued: which of the two runs first.
    fn order(busy: Duration) -> Vec<&'static str> {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let note = |log: &Arc<Mutex<Vec<&'static str>>>, what| {
            if let Ok(mut l) = log.lock() {
                l.push(what);
            }
        };
        rt.block_on(async {
            let wake = Arc::new(Notify::new());
            let (w, l) = (wake.clone(), log.clone());
            tokio::spawn(Deferred::new(
                Box::pin(async move {
                    loop {
                        w.notified().await;
                        note(&l, "driver");
                    }
                }),
                busy,
            ));
            tokio::time::sleep(Duration::from_millis(5)).await;
            let l = log.clone();
            tokio::spawn(async move {
                let other = l.clone();
                tokio::spawn(async move { note(&other, "queued task") });
                wake.notify_one();
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    #[test]
    fn a_driver_woken_soon_after_its_last_run_lets_runnable_tasks_go_first() {
        assert_eq!(order(Duration::MAX), ["queued task", "driver"]);
    }

    #[test]
    fn a_driver_woken_after_a_quiet_spell_runs_at_once() {
        // The premise of the module: tokio runs the woken driver before the queued task.
        assert_eq!(order(Duration::ZERO), ["driver", "queued task"]);
    }
}
