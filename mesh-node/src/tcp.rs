//! Raw TCP services: each accepted connection becomes one tunnel stream, under the same
//! admission as HTTPS, a place in the tunnel, and the TCP idle timeout.

use std::sync::Arc;

use skylane_shared::pipe::{IdleTimeout, Splice};
use skylane_shared::shards::Shards;
use skylane_shared::wire::{self, Reply, StreamHeader, StreamKind, WIRE_VERSION};
use tokio_util::sync::CancellationToken;

use crate::phases::accept::Admission;
use crate::reload::Live;
use crate::tunnel::OpenError;

/// Accepts connections on `listener` and tunnels them to `service` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: String,
    live: Arc<Live>,
    admission: Arc<Admission>,
    shards: Arc<Shards>,
    stop: CancellationToken,
) {
    loop {
        let Some((tcp, tcp_peer)) =
            skylane_shared::lifecycle::accept_until(&listener, &stop, "tcp").await
        else {
            return;
        };
        let service = service.clone();
        // Each connection runs under the config in force when it arrived.
        let edge = live.edge();
        let admission = admission.clone();
        shards.spawn_socket(tcp, move |tcp| async move {
            let Some((tcp, peer, _permit)) =
                crate::server::admit(tcp, tcp_peer, &edge, &admission, "tcp").await
            else {
                return;
            };
            let client = edge
                .policy
                .client_address
                .client(&peer, &http::HeaderMap::new());
            let Ok(_flow) = edge.policy.flows.open(client) else {
                metrics::counter!("skylane_edge_errors_total", "kind" => "overloaded").increment(1);
                return;
            };
            let stream = match edge
                .tunnels
                .open_stream(edge.policy.timeouts.tunnel_open, &[], &service)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    let kind = match e {
                        OpenError::NoTunnel => "no_connector",
                        OpenError::Saturated => "overloaded",
                    };
                    metrics::counter!("skylane_edge_errors_total", "kind" => kind).increment(1);
                    tracing::warn!(%client, %service, error = ?e, "no tunnel stream; closing tcp connection");
                    return;
                }
            };
            let (mut send, mut recv, _slot) = (stream.send, stream.recv, stream.slot);
            let n: u128 = rand::random();
            let header = StreamHeader {
                version: WIRE_VERSION,
                service: service.clone(),
                client_addr: Some(std::net::SocketAddr::new(client, peer.tcp.port())),
                request_id: format!("{n:032x}"),
                kind: StreamKind::Tcp,
            };
            if wire::write_frame(&mut send, &header).await.is_err() {
                return;
            }
            match wire::read_frame::<_, Reply>(&mut recv).await {
                Ok(Reply::Connected) => {
                    metrics::counter!("skylane_edge_tcp_connections_total", "service" => service.clone()).increment(1);
                    let idle = IdleTimeout::new(edge.policy.timeouts.tcp_idle);
                    if let Err(e) = Splice::new(recv, send, tcp, idle).await {
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
