//! Per-service stream metrics of the connector, as handles registered once.
//!
//! `metrics::counter!` with a runtime label builds the label set and looks the series up in
//! the registry on every call; the connector records several series per stream, so the
//! handles are made once per service and kept in its [`crate::origin::ServicePool`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::config::ServiceKind;

/// Streams taken and streams refused since start, for the connector's node report (its
/// rates on the status page).
static TAKEN: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Streams since start (taken or refused), and the refused among them.
pub fn totals() -> (u64, u64) {
    let refused = REFUSED.load(Ordering::Relaxed);
    (TAKEN.load(Ordering::Relaxed) + refused, refused)
}

/// Counts a refused stream: `skylane_connector_refused_total{reason}`.
pub fn stream_refused(reason: &'static str) {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("skylane_connector_refused_total", "reason" => reason).increment(1);
}

/// The stream metrics of one service.
#[derive(Clone, Debug)]
pub struct StreamMetrics {
    /// `skylane_connector_streams_total{service, kind}`.
    streams: Counter,
    /// `skylane_connector_stream_duration_seconds{kind}`: from the stream's arrival to its
    /// end (for upgrades and TCP, the whole connection).
    duration: Histogram,
}

impl StreamMetrics {
    /// Registers the series of a service.
    pub fn new(service: &str, kind: ServiceKind) -> Self {
        let kind = kind_label(kind);
        Self {
            streams: metrics::counter!("skylane_connector_streams_total", "service" => service.to_owned(), "kind" => kind),
            duration: metrics::histogram!("skylane_connector_stream_duration_seconds", "kind" => kind),
        }
    }

    /// Counts a stream accepted for the service.
    pub fn stream_started(&self) {
        self.streams.increment(1);
        TAKEN.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a stream lasted.
    pub fn stream_ended(&self, lasted: Duration) {
        self.duration.record(lasted.as_secs_f64());
    }
}

/// The label of a service kind.
pub fn kind_label(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::Http => "http",
        ServiceKind::Tcp => "tcp",
    }
}

/// Bytes moved between tunnels and origins: `skylane_connector_bytes_total{direction}`.
pub struct ByteCounters {
    /// From the edge to the origin (request bodies, upgraded and TCP bytes).
    pub to_origin: Counter,
    /// From the origin back to the edge.
    pub from_origin: Counter,
}

/// The process-wide byte counters.
pub fn bytes() -> &'static ByteCounters {
    static BYTES: OnceLock<ByteCounters> = OnceLock::new();
    BYTES.get_or_init(|| ByteCounters {
        to_origin: metrics::counter!("skylane_connector_bytes_total", "direction" => "to_origin"),
        from_origin: metrics::counter!("skylane_connector_bytes_total", "direction" => "from_origin"),
    })
}
