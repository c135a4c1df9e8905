//! Raw TCP services: each accepted connection becomes one tunnel stream.

use std::sync::Arc;

use skylane_shared::pipe::splice;
use skylane_shared::wire::{self, Reply, StreamHeader, StreamKind, WIRE_VERSION};
use tokio_util::sync::CancellationToken;

use crate::tunnel::TunnelPool;

/// Accepts connections on `listener` and tunnels them to `service` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: String,
    tunnels: Arc<TunnelPool>,
    stop: CancellationToken,
) {
    loop {
        let Some((tcp, client)) =
            skylane_shared::lifecycle::accept_until(&listener, &stop, "tcp").await
        else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let tunnels = tunnels.clone();
        tokio::spawn(async move {
            let Some((_, mut send, mut recv)) = tunnels.open_stream().await else {
                metrics::counter!("skylane_edge_errors_total", "kind" => "no_connector")
                    .increment(1);
                tracing::warn!(%client, %service, "no connector reachable; closing tcp connection");
                return;
            };
            let n: u128 = rand::random();
            let header = StreamHeader {
                version: WIRE_VERSION,
                service: service.clone(),
                client_addr: Some(client),
                request_id: format!("{n:032x}"),
                kind: StreamKind::Tcp,
            };
            if wire::write_frame(&mut send, &header).await.is_err() {
                return;
            }
            match wire::read_frame::<_, Reply>(&mut recv).await {
                Ok(Reply::Connected) => {
                    metrics::counter!("skylane_edge_tcp_connections_total", "service" => service.clone()).increment(1);
                    if let Err(e) = splice(recv, send, tcp).await {
                        tracing::debug!(%client, error = %e, "tcp flow ended with an error");
                    }
                }
                Ok(Reply::Refused(r)) => {
                    metrics::counter!("skylane_edge_errors_total", "kind" => r.kind.label())
                        .increment(1);
                    tracing::info!(%client, %service, reason = r.kind.label(), "connector refused tcp flow");
                }
                Ok(Reply::Response(_)) | Err(_) => {
                    metrics::counter!("skylane_edge_errors_total", "kind" => "tunnel_failed")
                        .increment(1);
                }
            }
        });
    }
}
