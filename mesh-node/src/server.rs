//! The edge's listeners and lifecycle: HTTPS (HTTP/1.1 + HTTP/2), the plain-HTTP
//! redirect, raw TCP, the admin API, and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use skylane_shared::lifecycle::Shutdown;
use skylane_shared::membership::Role;
use skylane_shared::mesh::MeshSocket;
use skylane_shared::mesh::control::MeshControl;
use skylane_shared::quic;
use skylane_shared::telemetry::{self, AdminRoutes};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::{self, Edge};
use crate::routes::Routes;
use crate::tunnel::TunnelPool;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Already-bound listeners, so tests can bind port 0 and read the ports back.
#[derive(Debug, Default)]
pub struct Listeners {
    /// HTTPS.
    pub https: Option<TcpListener>,
    /// Plain HTTP (redirects).
    pub http: Option<TcpListener>,
    /// Raw TCP listeners and their services, in config order.
    pub tcp: Vec<(TcpListener, String)>,
    /// Admin API.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        };
        let mut l = Listeners::default();
        if let Some(h) = &config.https {
            l.https = Some(bind(h.listen).await?);
        }
        if let Some(addr) = config.http_redirect {
            l.http = Some(bind(addr).await?);
        }
        for t in &config.tcp {
            l.tcp.push((bind(t.listen).await?, t.service.clone()));
        }
        if let Some(addr) = config.admin {
            l.admin = Some(bind(addr).await?);
        }
        Ok(l)
    }
}

struct Status {
    name: String,
    id: String,
    socket: Arc<MeshSocket>,
    tunnels: Arc<TunnelPool>,
    control: Arc<MeshControl>,
    draining: CancellationToken,
}

impl AdminRoutes for Status {
    fn status(&self) -> serde_json::Value {
        json!({
            "node": self.name,
            "id": self.id,
            "role": "edge",
            "mesh_socket": self.socket.udp_addr().map(|a| a.to_string()).unwrap_or_default(),
            "draining": self.draining.is_cancelled(),
            "tunnels": self.tunnels.status(),
            "frames": self.socket.counters().snapshot(),
            "mesh": self.control.status(),
        })
    }

    fn ready(&self) -> bool {
        !self.draining.is_cancelled() && self.tunnels.any_up()
    }
}

/// Runs the edge until shutdown.
pub async fn serve(
    config: Config,
    socket: Arc<MeshSocket>,
    listeners: Listeners,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let identity = config.identity.clone();
    let endpoint = quic::endpoint(socket.clone(), &identity.key, None)?;
    let stop_tunnels = CancellationToken::new();
    let control = MeshControl::start(
        socket.clone(),
        Role::Edge,
        config.routing.clone(),
        config.membership.clone(),
        stop_tunnels.clone(),
    )?;
    let tunnels = TunnelPool::start(
        endpoint.clone(),
        socket.clone(),
        control.clone(),
        identity.key.clone(),
        config.connectors.clone(),
        config.tunnel.clone(),
        stop_tunnels.clone(),
    );
    let edge = Arc::new(Edge {
        routes: Routes::new(config.routes.clone()),
        tunnels: tunnels.clone(),
    });
    let draining = shutdown.drain.clone();
    if let Some(admin) = listeners.admin {
        let status = Arc::new(Status {
            name: identity.me.name.clone(),
            id: identity.key.id().to_string(),
            socket: socket.clone(),
            tunnels: tunnels.clone(),
            control,
            draining: draining.clone(),
        });
        tokio::spawn(telemetry::serve_admin(
            admin,
            metrics,
            status,
            shutdown.now.clone(),
        ));
    }
    let tracker = TaskTracker::new();
    let connections = TaskTracker::new();
    let mut https_port = 443;
    if let (Some(listener), Some(https)) = (listeners.https, &config.https) {
        https_port = listener.local_addr()?.port();
        let tls = Arc::new(crate::tls::server_config(https)?);
        tracing::info!(listen = %listener.local_addr()?, "https listening");
        tracker.spawn(accept_https(
            listener,
            tls,
            edge.clone(),
            connections.clone(),
            draining.clone(),
        ));
    }
    if let Some(listener) = listeners.http {
        tracing::info!(listen = %listener.local_addr()?, "http redirect listening");
        tracker.spawn(crate::redirect::serve(
            listener,
            https_port,
            draining.clone(),
        ));
    }
    for (listener, service) in listeners.tcp {
        tracing::info!(listen = %listener.local_addr()?, %service, "tcp listening");
        tracker.spawn(crate::tcp::serve(
            listener,
            service,
            tunnels.clone(),
            draining.clone(),
        ));
    }
    tracing::info!(node = %identity.me.name, id = %identity.key.id(), mesh = %socket.udp_addr()?, "edge ready");
    tokio::select! {
        _ = draining.cancelled() => {}
        _ = shutdown.now.cancelled() => {}
    }
    tracing::info!(
        grace_ms = config.shutdown_grace.as_millis() as u64,
        "draining connections"
    );
    tracker.close();
    tracker.wait().await;
    connections.close();
    tokio::select! {
        _ = connections.wait() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(config.shutdown_grace) => tracing::warn!("grace period over; closing open connections"),
        _ = shutdown.now.cancelled() => {}
    }
    stop_tunnels.cancel();
    endpoint.close(0u32.into(), b"edge shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(())
}

async fn accept_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    edge: Arc<Edge>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Some((tcp, client)) =
            skylane_shared::lifecycle::accept_until(&listener, &stop, "https").await
        else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let edge = edge.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!("skylane_edge_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%client, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!("skylane_edge_tls_handshake_failures_total").increment(1);
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                proxy::handle(edge.clone(), req, client, "https")
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .enable_connect_protocol()
                .max_concurrent_streams(1000);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(conn);
            // On drain, finish in-flight requests, refuse new ones, then close.
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%client, error = %e, "connection ended with an error");
            }
        });
    }
}
