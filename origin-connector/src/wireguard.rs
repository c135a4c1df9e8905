//! Flows from edges that reach this connector through a stock WireGuard endpoint in front
//! of it (wg-quick, a firewall, a cloud VPN gateway): each flow is one TCP connection to
//! the connector's address on the WireGuard interface, carrying the same stream header
//! and bytes as a QUIC stream of a mesh tunnel.
//!
//! WireGuard authenticated the packets; the connector accepts only the configured tunnel
//! source addresses, and refuses the rest without reading a byte.

use std::sync::Arc;

use skylane_shared::flow;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WireguardListener;
use crate::forward::{self, Context};

/// Accepts flows on `listener` until `drain` is cancelled; each flow runs on `streams`.
pub async fn serve(
    listener: TcpListener,
    config: WireguardListener,
    ctx: Context,
    streams: TaskTracker,
    drain: CancellationToken,
) {
    let room = Arc::new(tokio::sync::Semaphore::new(config.max_flows));
    tracing::info!(listen = %config.listen, "accepting flows through WireGuard");
    loop {
        let (tcp, from) = tokio::select! {
            _ = drain.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accepting a WireGuard flow failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !config
            .allowed_sources
            .iter()
            .any(|n| n.contains(&from.ip()))
        {
            metrics::counter!("skylane_connector_wireguard_refused_total", "reason" => "source")
                .increment(1);
            tracing::warn!(%from, "flow from a source outside wireguard.allowed_sources refused");
            continue;
        }
        let Ok(permit) = room.clone().try_acquire_owned() else {
            metrics::counter!("skylane_connector_wireguard_refused_total", "reason" => "full")
                .increment(1);
            tracing::warn!(%from, max = config.max_flows, "WireGuard flow listener full; flow refused");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (send, recv) = flow::from_tokio_tcp(tcp);
        let peer: Arc<str> = Arc::from(format!("wireguard:{}", from.ip()));
        let ctx = ctx.clone();
        streams.spawn(async move {
            let _permit = permit;
            forward::handle_stream(ctx, peer, send, recv).await;
        });
    }
}
