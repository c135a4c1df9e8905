//! Flows that arrive over WireGuard instead of QUIC, carrying the same stream header and
//! bytes as a QUIC stream of a mesh tunnel:
//! - from edges behind a stock WireGuard endpoint in front of the connector (wg-quick, a
//!   firewall, a cloud VPN gateway): one TCP connection each to the connector's address
//!   on the WireGuard interface ([`serve`]). WireGuard authenticated the packets; only the
//!   configured tunnel source addresses are accepted, the rest refused unread;
//! - from edges over the mesh socket, when this connector's member entry says
//!   `transport = "wireguard"` ([`serve_mesh`]): one userspace tunnel per edge member,
//!   whose handshake proves the edge's node key.

use std::sync::Arc;

use skylane_shared::flow;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use skylane_shared::config::Identity;
use skylane_shared::membership::Role;
use skylane_shared::mesh::MeshSocket;
use skylane_shared::wireguard::WgTunnel;
use skylane_shared::wireguard::mesh::MeshWireguard;

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

/// Starts a WireGuard tunnel over the mesh for every edge member, and serves the flows
/// each edge opens in it until `drain`; the tunnels stop with `stop`.
pub fn serve_mesh(
    socket: &Arc<MeshSocket>,
    identity: &Identity,
    ctx: Context,
    streams: TaskTracker,
    drain: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Arc<WgTunnel>>> {
    let key = skylane_shared::wireguard::SecretKey::derived_from(&identity.key)
        .map_err(|e| anyhow::anyhow!("no WireGuard key for the mesh: {e}"))?;
    let mesh = MeshWireguard::start(socket.clone(), key, stop)
        .ok_or_else(|| anyhow::anyhow!("the mesh socket's WireGuard queue is taken"))?;
    let mut tunnels = Vec::new();
    for edge in identity.members.iter().filter(|m| m.role == Role::Edge) {
        let tunnel = mesh.from_edge(edge)?;
        tunnels.push(tunnel.clone());
        let (ctx, streams, drain) = (ctx.clone(), streams.clone(), drain.clone());
        let peer: Arc<str> = Arc::from(edge.name.as_str());
        tokio::spawn(async move {
            loop {
                let flow = tokio::select! {
                    _ = drain.cancelled() => return,
                    f = tunnel.accept() => f,
                };
                let (send, recv) = flow::from_wireguard(flow);
                streams.spawn(forward::handle_stream(
                    ctx.clone(),
                    peer.clone(),
                    send,
                    recv,
                ));
            }
        });
    }
    tracing::info!(
        edges = tunnels.len(),
        "accepting flows over WireGuard through the mesh"
    );
    Ok(tunnels)
}
