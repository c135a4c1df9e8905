//! One client connection's clock: which timeout applies to it now.
//!
//! A connection is in one of three states, and each has its deadline:
//!
//! | state | deadline |
//! |---|---|
//! | no request yet (TLS just finished) | `request_head` after the handshake: an idle TLS connection ends here |
//! | a request head is arriving (HTTP/1: a byte came while no request was in flight) | `request_head` after its first byte: slow-header (slowloris) clients end here |
//! | idle between requests (keep-alive) | `keepalive_idle` after the last response ended |
//!
//! While a request is in flight no deadline applies here; bodies have their own idle
//! timeout. [`Watched`] wraps the connection's I/O to see bytes arrive; the proxy marks
//! requests in and out with [`ConnWatch::request_started`]. The deadline decision itself
//! is [`ConnWatch::deadline`], a pure function of the state and `now`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::config::Timeouts;

/// Milliseconds on a monotonic clock since the process started (cheap to store in an
/// atomic, unlike an `Instant`).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The instant `ms` (as [`now_ms`] counts) stands for.
pub fn instant_of(ms: u64) -> tokio::time::Instant {
    let now = now_ms();
    let now_instant = tokio::time::Instant::now();
    if ms >= now {
        now_instant + Duration::from_millis(ms - now)
    } else {
        now_instant
            .checked_sub(Duration::from_millis(now - ms))
            .unwrap_or(now_instant)
    }
}

/// Why a connection's deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No request arrived after the TLS handshake.
    NoRequest,
    /// A request head did not arrive whole in time.
    SlowHead,
    /// A keep-alive connection sat idle.
    Idle,
}

impl Expiry {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Expiry::NoRequest => "no_request",
            Expiry::SlowHead => "slow_head",
            Expiry::Idle => "keepalive_idle",
        }
    }
}

/// The shared state of one connection.
#[derive(Debug)]
pub struct ConnWatch {
    /// Requests in flight (HTTP/2 has many; upgrades count until their pipe ends).
    inflight: AtomicU32,
    /// Whether any request arrived yet.
    served: AtomicBool,
    /// Whether the connection speaks HTTP/2 (its frames, pings included, are not heads).
    h2: AtomicBool,
    /// [`now_ms`] of the first byte read while no request was in flight; 0: none.
    head_started_ms: AtomicU64,
    /// [`now_ms`] when the connection last became idle (or the handshake ended).
    idle_since_ms: AtomicU64,
    /// Wakes the connection's watchdog when its deadline may have moved.
    changed: Notify,
    /// The connection's place under the connection caps: held as long as the connection
    /// or a request of it lives (an upgraded websocket outlives its HTTP connection).
    _permit: Option<crate::phases::accept::ConnPermit>,
}

impl ConnWatch {
    /// A connection whose handshake just ended, holding its admission `permit`.
    pub fn new(permit: Option<crate::phases::accept::ConnPermit>) -> Arc<Self> {
        Arc::new(Self {
            inflight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            head_started_ms: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
            changed: Notify::new(),
            _permit: permit,
        })
    }

    /// A request (head complete) starts; it ends when the guard drops (after its
    /// response body, or its upgraded pipe).
    pub fn request_started(self: &Arc<Self>, h2: bool) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        self.h2.store(h2, Ordering::Relaxed);
        self.head_started_ms.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn bytes_arrived(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            // 0 means "none", so a byte in the very first millisecond counts as 1.
            self.head_started_ms
                .store(now_ms().max(1), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// The deadline in force at `now` (as [`now_ms`] counts), and what it would mean;
    /// `None` while a request is in flight.
    pub fn deadline(&self, timeouts: &Timeouts) -> Option<(u64, Expiry)> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let head = self.head_started_ms.load(Ordering::Relaxed);
        if !self.served.load(Ordering::Relaxed) {
            // The first head has the same time from the handshake whether it trickles in
            // or never starts; the reason says which.
            let since = self.idle_since_ms.load(Ordering::Relaxed);
            let why = if head != 0 {
                Expiry::SlowHead
            } else {
                Expiry::NoRequest
            };
            return Some((since + ms(timeouts.request_head), why));
        }
        if head != 0 {
            return Some((head + ms(timeouts.request_head), Expiry::SlowHead));
        }
        let since = self.idle_since_ms.load(Ordering::Relaxed);
        Some((since + ms(timeouts.keepalive_idle), Expiry::Idle))
    }

    /// Whether a request arrived on the connection yet.
    pub fn has_served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until the state changes (a request starts or ends, a head starts).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// A request in flight on a connection; dropping it marks the end.
#[derive(Debug)]
pub struct InFlight(Arc<ConnWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let w = &self.0;
        if w.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            w.idle_since_ms.store(now_ms(), Ordering::Relaxed);
            w.changed.notify_one();
        }
    }
}

/// A connection's I/O, reporting arriving bytes to its [`ConnWatch`].
#[derive(Debug)]
pub struct Watched<IO> {
    io: IO,
    watch: Arc<ConnWatch>,
}

impl<IO> Watched<IO> {
    /// Wraps `io`.
    pub fn new(io: IO, watch: Arc<ConnWatch>) -> Self {
        Self { io, watch }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.bytes_arrived();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs `conn` (a hyper connection future) under `watch`'s deadlines: an expired
/// deadline drops the connection (closing it), counted by reason. `graceful` asks a
/// connection to close politely (no new requests; HTTP/2 GOAWAY): when it sat idle past
/// its keep-alive deadline (given `grace` to finish), and when `drain` is cancelled (given
/// as long as it takes; the caller bounds the drain). A connection that has served no
/// request yet when the drain starts first gets its request-head time for one to arrive:
/// one accepted a moment before the drain has its first request on the way, and closing
/// it unanswered would fail that request.
pub async fn supervise<F, T>(
    mut conn: Pin<&mut F>,
    watch: &ConnWatch,
    timeouts: &Timeouts,
    mut graceful: impl FnMut(Pin<&mut F>),
    grace: Duration,
    drain: &tokio_util::sync::CancellationToken,
) -> Option<T>
where
    F: std::future::Future<Output = T>,
{
    loop {
        let deadline = watch.deadline(timeouts);
        let sleep = async {
            match deadline {
                Some((ms, _)) => tokio::time::sleep_until(instant_of(ms)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = conn.as_mut() => return Some(out),
            _ = watch.changed() => continue,
            _ = drain.cancelled() => {
                if !watch.has_served() {
                    let first = async {
                        while !watch.has_served() {
                            tokio::select! {
                                _ = watch.changed() => {}
                                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                            }
                        }
                    };
                    let wait = tokio::time::timeout(timeouts.request_head, first);
                    tokio::select! {
                        out = conn.as_mut() => return Some(out),
                        _ = wait => {}
                    }
                }
                graceful(conn.as_mut());
                return Some(conn.await);
            }
            _ = sleep => {}
        }
        // The state may have changed just as the deadline passed: look again.
        let Some((ms, why)) = watch.deadline(timeouts) else {
            continue;
        };
        if ms > now_ms() {
            continue;
        }
        metrics::counter!("skylane_edge_connections_closed_total", "reason" => why.label())
            .increment(1);
        if why == Expiry::Idle {
            graceful(conn.as_mut());
            return tokio::time::timeout(grace, conn).await.ok();
        }
        return None;
    }
}

#[cfg(test)]
mod tests {
    //! Real time with short timeouts (tokio's paused clock would need its `test-util`
    //! feature, which would also change the build of every crate above tokio in test runs:
    //! the end-to-end tests' binaries would then be built twice). Lower bounds are exact;
    //! upper bounds leave room for a loaded machine.
    use super::*;

    const HEAD: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(1200);

    fn timeouts() -> Timeouts {
        Timeouts {
            request_head: HEAD,
            keepalive_idle: IDLE,
            ..Timeouts::default()
        }
    }

    /// `deadline` is `at_ms` plus `after`, within the milliseconds between the two clock reads.
    fn near(deadline: Option<(u64, Expiry)>, before_ms: u64, after: Duration, why: Expiry) {
        let (at, got) = deadline.expect("a deadline");
        assert_eq!(got, why);
        let after = after.as_millis() as u64;
        assert!(
            at >= before_ms + after && at <= now_ms() + after,
            "{at} not in {}..={}",
            before_ms + after,
            now_ms() + after
        );
    }

    #[tokio::test]
    async fn each_state_has_its_deadline() {
        let t = timeouts();
        let start = now_ms();
        let w = ConnWatch::new(None);
        near(w.deadline(&t), start, HEAD, Expiry::NoRequest);
        // A request in flight: no deadline; after it, the keep-alive idle one.
        let r = w.request_started(false);
        assert_eq!(w.deadline(&t), None);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = now_ms();
        drop(r);
        near(w.deadline(&t), idle, IDLE, Expiry::Idle);
        // A byte of the next head: the head deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let head = now_ms();
        w.bytes_arrived();
        near(w.deadline(&t), head, HEAD, Expiry::SlowHead);
        // On HTTP/2, frames between requests are not heads.
        let r = w.request_started(true);
        drop(r);
        w.bytes_arrived();
        assert_eq!(w.deadline(&t).map(|d| d.1), Some(Expiry::Idle));
    }

    #[tokio::test]
    async fn supervise_drops_a_slow_head_and_lets_a_busy_connection_be() {
        let t = timeouts();
        let w = ConnWatch::new(None);
        let _r = w.request_started(false);
        drop(_r);
        w.bytes_arrived();
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let started = tokio::time::Instant::now();
        let drain = tokio_util::sync::CancellationToken::new();
        let out = supervise(
            never.as_mut(),
            &w,
            &t,
            |_| {},
            Duration::from_millis(50),
            &drain,
        )
        .await;
        assert!(out.is_none());
        let took = tokio::time::Instant::now() - started;
        // now_ms counts whole milliseconds: a deadline can fall up to 1 ms early.
        assert!(
            took >= HEAD - Duration::from_millis(1) && took < HEAD + Duration::from_secs(5),
            "{took:?}"
        );

        // A request in flight three times the head timeout and the idle timeout: kept.
        let w = ConnWatch::new(None);
        let busy = w.request_started(false);
        let work = async {
            tokio::time::sleep(IDLE + HEAD * 3).await;
            7
        };
        tokio::pin!(work);
        let out = supervise(
            work.as_mut(),
            &w,
            &t,
            |_| {},
            Duration::from_millis(50),
            &drain,
        )
        .await;
        assert_eq!(out, Some(7));
        drop(busy);
    }
}
