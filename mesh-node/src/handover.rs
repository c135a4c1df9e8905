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

use skylane_shared::handover::Successor;
use skylane_shared::mesh::MeshSocket;

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
    skylane_shared::handover::announce_ready(successor, then).await;
}
