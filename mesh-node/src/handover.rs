//! Restart without refusing connections, the edge's part (the mechanism is
//! [`skylane_shared::handover`]).
//!
//! A running edge waits for a successor on its hand-over point. `mesh-node --take-over
//! --config …` started beside it receives its listening sockets and mesh socket, starts on
//! them, and says it serves once a tunnel is up. The old process then drains as on SIGTERM:
//! it stops accepting (the sockets stay open in the new process, so nothing is refused),
//! finishes its requests and websockets in flight within `shutdown_grace_ms`, its QUIC
//! connections carried through the pipe by the new process, and exits. If the successor
//! goes away before it serves, the old process takes its QUIC connections back onto the
//! mesh socket and waits for the next one.

use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use skylane_shared::handover::{self, HandoverPoint, Successor};
use skylane_shared::mesh::handoff::PipeSocket;
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use tokio_util::sync::CancellationToken;

use crate::server::Listeners;
use crate::tunnel::TunnelPool;

/// How long a successor waits for a tunnel before saying it serves anyway.
const TUNNEL_WAIT: Duration = Duration::from_secs(20);

/// Copies of the descriptors of every socket a successor takes, by label.
pub fn sockets(
    listeners: &Listeners,
    socket: &MeshSocket,
) -> std::io::Result<Vec<(String, OwnedFd)>> {
    let mut out = vec![("mesh".to_owned(), socket.as_fd().try_clone_to_owned()?)];
    let mut add = |label: String, l: &tokio::net::TcpListener| -> std::io::Result<()> {
        out.push((label, l.as_fd().try_clone_to_owned()?));
        Ok(())
    };
    if let Some(l) = &listeners.https {
        add("https".into(), l)?;
    }
    if let Some(l) = &listeners.http {
        add("http".into(), l)?;
    }
    if let Some(l) = &listeners.admin {
        add("admin".into(), l)?;
    }
    for (l, _) in &listeners.tcp {
        add(format!("tcp/{}", l.local_addr()?), l)?;
    }
    Ok(out)
}

/// The old process's side: hands `sockets` to each successor that asks at `point`, moves
/// `endpoint`'s connections onto the pipe, and starts the drain once the successor serves.
pub async fn serve_successors(
    point: String,
    sockets: Vec<(String, OwnedFd)>,
    socket: Arc<MeshSocket>,
    endpoint: quinn::Endpoint,
    generation: u8,
    drain: CancellationToken,
) {
    let sockets = Arc::new(sockets);
    loop {
        let listening = match HandoverPoint::listen(&point) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no hand-over point: a restart will refuse connections");
                return;
            }
        };
        let stream = tokio::select! {
            _ = drain.cancelled() => return,
            s = listening.accept() => s,
        };
        // The name is free for the successor's own point from here on.
        drop(listening);
        let offered = stream.and_then(|stream| {
            let borrowed: Vec<(String, std::os::fd::BorrowedFd<'_>)> = sockets
                .iter()
                .map(|(l, fd)| (l.clone(), fd.as_fd()))
                .collect();
            let pipe = handover::offer(&stream, generation, &borrowed)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok((stream, pipe))
        });
        let (stream, pipe) = match offered {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over to a successor failed");
                continue;
            }
        };
        tracing::info!("a successor took the sockets; this process's connections go on through it");
        let me = virtual_addr(&socket.local_id());
        let rebound = PipeSocket::new(pipe, me).and_then(|p| endpoint.rebind_abstract(Arc::new(p)));
        match rebound {
            // From here the successor reads every datagram.
            Ok(()) => socket.set_handed_over(true),
            Err(e) => tracing::warn!(error = %e, "could not move the tunnels onto the pipe"),
        }
        let ready = handover::await_ready(stream).await;
        if ready {
            tracing::info!("the successor serves: draining");
            drain.cancel();
            return;
        }
        tracing::warn!("the successor went away before it served; taking the tunnels back");
        socket.set_handed_over(false);
        if let Err(e) = endpoint.rebind_abstract(socket.clone()) {
            tracing::error!(error = %e, "could not take the tunnels back");
            return;
        }
    }
}

/// The new process's side: once a tunnel is up (or after a while), tells the old process
/// it serves, then becomes the hand-over point for its own successor.
pub async fn announce_ready(
    successor: Successor,
    tunnels: Arc<TunnelPool>,
    then: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let deadline = tokio::time::Instant::now() + TUNNEL_WAIT;
    while !tunnels.any_up() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match tokio::task::spawn_blocking(move || successor.ready()).await {
        Ok(Ok(())) => tracing::info!("serving: the process taken over drains"),
        _ => tracing::warn!("could not tell the process taken over that this one serves"),
    }
    then.await;
}
