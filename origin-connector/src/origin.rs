//! Origin services: their servers, pooled keep-alive connections, health state and
//! server choice.
//!
//! Each server is `up` or `down`. Active health checks move it after a run of successes or
//! failures; a failed connection while forwarding counts as a failure too, so a dead
//! server stops getting traffic before the next check comes round. Servers start `up`, so
//! a fresh connector serves at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use skylane_shared::resolve::{ResolveError, Resolver};
use tokio_util::sync::CancellationToken;

use crate::config::{HealthCheck, Service, ServiceKind};
use crate::dial::Dial;
use crate::pool::IdleConns;
use crate::stream_metrics::StreamMetrics;

/// The body type sent to origins.
pub type OriginBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// One origin server of a service.
#[derive(Debug)]
pub struct OriginServer {
    /// `host:port` as configured.
    pub spec: String,
    up: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    resolved: Mutex<Option<(SocketAddr, Option<Instant>)>>,
    /// Keep-alive connections waiting for a request.
    pub(crate) idle: IdleConns,
}

impl OriginServer {
    fn new(spec: String) -> Self {
        Self {
            spec,
            up: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            resolved: Mutex::new(None),
            idle: IdleConns::default(),
        }
    }

    /// Whether the server takes traffic.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Its current address, resolving the name when the cached answer expired.
    pub async fn addr(&self, resolver: &Resolver) -> Result<SocketAddr, ResolveError> {
        if let Ok(cached) = self.resolved.lock()
            && let Some((addr, until)) = *cached
            && until.is_none_or(|t| Instant::now() < t)
        {
            return Ok(addr);
        }
        let r = resolver.resolve(&self.spec).await?;
        let addr = r.addrs[0];
        if let Ok(mut cached) = self.resolved.lock() {
            *cached = Some((addr, r.valid_until));
        }
        Ok(addr)
    }

    /// Forgets the resolved address, so the next use asks DNS again (after a failed
    /// connection the address may have moved).
    pub fn forget_address(&self) {
        if let Ok(mut cached) = self.resolved.lock() {
            *cached = None;
        }
    }

    fn record(&self, ok: bool, service: &str, thresholds: (u32, u32)) {
        let (up_after, down_after) = thresholds;
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.is_up() && n >= up_after {
                self.up.store(true, Ordering::Relaxed);
                tracing::info!(service, server = %self.spec, "origin server is up");
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.is_up() && n >= down_after {
                self.up.store(false, Ordering::Relaxed);
                tracing::warn!(service, server = %self.spec, "origin server is down");
            }
        }
        metrics::gauge!("skylane_origin_server_up", "service" => service.to_owned(), "server" => self.spec.clone())
            .set(if self.is_up() { 1.0 } else { 0.0 });
    }
}

/// A service with its servers, their keep-alive connections ([`crate::pool`]) and their
/// health.
#[derive(Debug)]
pub struct ServicePool {
    /// The validated config.
    pub service: Service,
    /// Its servers.
    pub servers: Vec<Arc<OriginServer>>,
    /// How connections to the servers are opened.
    pub dial: Dial,
    next: AtomicUsize,
    /// Registered on first use, after the metrics recorder is installed.
    metrics: std::sync::OnceLock<StreamMetrics>,
    /// Room for the service's concurrent flows (`max_concurrent_streams`).
    pub room: Arc<tokio::sync::Semaphore>,
}

impl ServicePool {
    /// Builds the pool for one service, reaching its servers through this machine's
    /// network.
    pub fn new(service: Service) -> Self {
        Self::with_dial(service, Dial::Kernel)
    }

    /// Builds the pool for one service whose servers are reached with `dial`.
    pub fn with_dial(service: Service, dial: Dial) -> Self {
        let servers = service
            .servers
            .iter()
            .map(|s| Arc::new(OriginServer::new(s.clone())))
            .collect();
        Self {
            room: Arc::new(tokio::sync::Semaphore::new(service.max_concurrent_streams)),
            service,
            servers,
            dial,
            next: AtomicUsize::new(0),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// The service's stream metrics.
    pub fn metrics(&self) -> &StreamMetrics {
        self.metrics
            .get_or_init(|| StreamMetrics::new(&self.service.name, self.service.kind))
    }

    fn thresholds(&self) -> (u32, u32) {
        self.service
            .health
            .as_ref()
            .map(|h| (h.healthy_threshold, h.unhealthy_threshold))
            .unwrap_or((1, 1))
    }

    /// Servers that are up, starting from the next in round-robin order.
    pub fn candidates(&self) -> Vec<Arc<OriginServer>> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.servers[(start + i) % n])
            .filter(|s| s.is_up())
            .cloned()
            .collect()
    }

    /// Records that forwarding to `server` failed to connect.
    pub fn record_failure(&self, server: &OriginServer) {
        server.forget_address();
        server.record(false, &self.service.name, self.thresholds());
    }

    /// Runs active health checks for every server until `stop`.
    pub fn spawn_health_checks(
        self: &Arc<Self>,
        resolver: Resolver,
        stop: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) {
        let Some(check) = self.service.health.clone() else {
            return;
        };
        for server in &self.servers {
            let pool = self.clone();
            let server = server.clone();
            let check = check.clone();
            let resolver = resolver.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(check.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let ok = pool.check_once(&server, &check, &resolver).await;
                    server.record(ok, &pool.service.name, pool.thresholds());
                }
            });
        }
    }

    async fn check_once(
        &self,
        server: &OriginServer,
        check: &HealthCheck,
        resolver: &Resolver,
    ) -> bool {
        let attempt = async {
            let addr = server.addr(resolver).await.ok()?;
            match self.service.kind {
                ServiceKind::Tcp => self.dial.tcp(addr, check.timeout).await.ok().map(|_| true),
                ServiceKind::Http => {
                    let req = http::Request::get(check.path.as_str())
                        .header(http::header::HOST, addr.to_string())
                        .header(http::header::USER_AGENT, "skylane-health-check")
                        .body(empty_body())
                        .ok()?;
                    let (resp, conn) = self.send(server, addr, req).await.ok()?;
                    let status = resp.status();
                    // Read to the end, the connection serves the next request.
                    if http_body_util::BodyExt::collect(resp.into_body())
                        .await
                        .is_ok()
                    {
                        self.release(server, conn);
                    }
                    Some(status.is_success() || status.is_redirection())
                }
            }
        };
        let ok = matches!(
            tokio::time::timeout(check.timeout, attempt).await,
            Ok(Some(true))
        );
        if !ok {
            server.forget_address();
        }
        ok
    }
}

/// An empty origin request body.
pub fn empty_body() -> OriginBody {
    use http_body_util::BodyExt as _;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}
