//! Per-service request metrics of the edge, as handles registered once.
//!
//! `metrics::counter!` with a runtime label builds the label set and looks the series up in
//! the registry on every call; the edge records two series per request, so the handles are
//! made once per service and kept with its route.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use metrics::{Counter, Histogram};

/// Status classes, in the order of [`RequestMetrics::by_class`].
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Responses of every service since start, and the 5xx among them: the edge's node report
/// (its request and error rates on the status page) reads them.
static ANSWERED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Responses since start, and the 5xx among them.
pub fn totals() -> (u64, u64) {
    (
        ANSWERED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    )
}

/// The request metrics of one service.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    /// `skylane_edge_requests_total{service, status}` for each status class.
    by_class: [Counter; 5],
    /// `skylane_edge_response_head_seconds{service}`: from the request's arrival to its
    /// response head.
    head_seconds: Histogram,
}

impl RequestMetrics {
    /// Registers the series of `service`.
    pub fn new(service: &str) -> Self {
        let by_class = CLASSES.map(|class| {
            metrics::counter!("skylane_edge_requests_total", "service" => service.to_owned(), "status" => class)
        });
        let head_seconds = metrics::histogram!("skylane_edge_response_head_seconds", "service" => service.to_owned());
        Self {
            by_class,
            head_seconds,
        }
    }

    /// The series for requests no route matched (`service="none"`).
    pub fn unrouted() -> &'static Self {
        static UNROUTED: std::sync::OnceLock<RequestMetrics> = std::sync::OnceLock::new();
        UNROUTED.get_or_init(|| Self::new("none"))
    }

    /// Counts one response and the time its head took.
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].increment(1);
        ANSWERED.fetch_add(1, Ordering::Relaxed);
        if class == 4 {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        self.head_seconds.record(elapsed.as_secs_f64());
    }
}
