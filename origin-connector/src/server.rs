//! The connector's main loop: accept tunnels from members, serve their streams, drain on
//! shutdown, or hand the sockets to a successor process (`--take-over`) and drain then.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use skylane_shared::handover::Successor;
use skylane_shared::lifecycle::Shutdown;
use skylane_shared::membership::Role;
use skylane_shared::mesh::MeshSocket;
use skylane_shared::mesh::control::MeshControl;
use skylane_shared::mesh::report;
use skylane_shared::resolve::Resolver;
use skylane_shared::shards::Shards;
use skylane_shared::telemetry::{self, AdminRoutes};
use skylane_shared::{quic, trust};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::forward::{self, Context};
use crate::reload::Services;

/// Open tunnels, for the status page.
#[derive(Default)]
struct Tunnels {
    by_id: Mutex<HashMap<usize, (String, quinn::Connection, Instant)>>,
}

struct Status {
    /// WireGuard tunnels from edges over the mesh (`transport = "wireguard"`).
    mesh_tunnels: Vec<Arc<skylane_shared::wireguard::WgTunnel>>,
    config_name: String,
    node_id: String,
    socket: Arc<MeshSocket>,
    tunnels: Arc<Tunnels>,
    services: Arc<Services>,
    control: Arc<MeshControl>,
    draining: CancellationToken,
}

impl AdminRoutes for Status {
    fn status(&self) -> serde_json::Value {
        let tunnels: Vec<_> = self
            .tunnels
            .by_id
            .lock()
            .map(|t| {
                t.values()
                    .map(|(peer, conn, since)| {
                        json!({
                            "peer": peer,
                            "rtt_ms": conn.rtt().as_secs_f64() * 1000.0,
                            "up_for_s": since.elapsed().as_secs(),
                            "quic": quic::PathStats::of(conn),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let services: Vec<_> = self
            .services
            .all()
            .values()
            .map(|p| {
                json!({
                    "name": p.service.name,
                    "kind": p.service.kind,
                    "servers": p.servers.iter().map(|s| json!({"server": s.spec, "up": s.is_up()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "node": self.config_name,
            "id": self.node_id,
            "role": "connector",
            "mesh_socket": self.socket.udp_addr().map(|a| a.to_string()).unwrap_or_default(),
            "draining": self.draining.is_cancelled(),
            "config_generation": self.services.generation(),
            "tunnels": tunnels,
            "wireguard_tunnels": self.mesh_tunnels.iter().map(|t| t.status()).collect::<Vec<_>>(),
            "services": services,
            "frames": self.socket.counters().snapshot(),
            "mesh": self.control.status(),
        })
    }

    fn ready(&self) -> bool {
        !self.draining.is_cancelled()
    }

    fn action(&self, path: &str, _body: &[u8]) -> Option<Result<serde_json::Value, String>> {
        // The node reads its own config file: the body names nothing.
        (path == "/reload").then(|| {
            self.services
                .reload()
                .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string()))
        })
    }
}

/// The TCP listeners a connector may have, bound before it starts.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The admin API.
    pub admin: Option<tokio::net::TcpListener>,
    /// Flows through a WireGuard endpoint (`[wireguard] listen`).
    pub wireguard: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Takes each listener the config names from a process taken over, when it handed one
    /// over on that address, and binds the others.
    pub async fn take_or_bind(
        config: &Config,
        mut taken: Option<&mut Successor>,
    ) -> anyhow::Result<Self> {
        let mut listen = async |label: &str, addr: std::net::SocketAddr, what: &str| {
            skylane_shared::cli::take_or_bind_listener(taken.as_deref_mut(), label, addr)
                .await
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))
        };
        let mut l = Listeners::default();
        if let Some(a) = &config.admin {
            l.admin = Some(listen("admin", a.listen, "cannot bind the admin listener").await?);
        }
        if let Some(w) = &config.wireguard {
            let what = "cannot bind wireguard.listen (is the WireGuard interface up?)";
            l.wireguard = Some(listen("wireguard", w.listen, what).await?);
        }
        Ok(l)
    }

    /// Copies of the descriptors a successor takes, by label, the mesh socket first.
    fn for_successor(&self, socket: &MeshSocket) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let mut out = vec![("mesh".to_owned(), socket.as_fd().try_clone_to_owned()?)];
        for (label, l) in [("admin", &self.admin), ("wireguard", &self.wireguard)] {
            if let Some(l) = l {
                out.push((label.to_owned(), l.as_fd().try_clone_to_owned()?));
            }
        }
        Ok(out)
    }
}

/// Runs the connector on an already-bound mesh socket (and TCP listeners) until shutdown.
/// `successor`: what this process took over from a running one (`--take-over`), which
/// drains once this one serves.
pub async fn serve(
    config: Config,
    config_path: std::path::PathBuf,
    socket: Arc<MeshSocket>,
    listeners: Listeners,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: Shutdown,
    mut successor: Option<Successor>,
) -> anyhow::Result<()> {
    let identity = config.identity.clone();
    // The runtime `main` built is shard 0's; this starts the others.
    let shards = Shards::for_config(config.worker_threads)
        .map_err(|e| anyhow::anyhow!("cannot start the connector's shards: {e}"))?;
    // A process that took over another issues connection IDs of the next generation, so
    // the old one's packets can be told apart and passed back to it.
    let generation = skylane_shared::handover::generation_after(successor.as_mut(), &socket)?;
    let endpoint = quic::endpoint(socket.clone(), &identity.key, true, generation)?;
    let handover_point = skylane_shared::handover::point_name(&identity.me.name, config.listen);
    let handover_sockets = listeners.for_successor(&socket)?;
    let resolver = Resolver::from_system();
    let tracker = TaskTracker::new();
    let stop_checks = CancellationToken::new();
    let control = MeshControl::start(
        socket.clone(),
        Role::Connector,
        config.routing.clone(),
        config.membership.clone(),
        stop_checks.clone(),
    )?;
    let shutdown_grace = config.shutdown_grace;
    let admin_token = config.admin.as_ref().and_then(|a| a.token.clone());
    let service_count = config.services.len();
    let wireguard = config.wireguard.clone();
    let services = Services::start(
        config_path,
        config,
        resolver.clone(),
        stop_checks.clone(),
        tracker.clone(),
    );
    // A reload may change the member list: the mesh takes it.
    services.attach_mesh(control.clone());
    {
        let (services, signal, stop) = (
            services.clone(),
            shutdown.reload.clone(),
            stop_checks.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    // Logged and counted inside; a refused config leaves the old one serving.
                    _ = signal.notified() => { let _ = services.reload(); }
                }
            }
        });
    }
    let draining = CancellationToken::new();
    let restarting = Arc::new(AtomicBool::new(false));
    let streams = TaskTracker::new();
    let ctx = Context {
        services: services.clone(),
        resolver,
        draining: draining.clone(),
        restarting: restarting.clone(),
        pipes: streams.clone(),
    };
    let tunnels = Arc::new(Tunnels::default());
    {
        let tunnels = tunnels.clone();
        control.spawn_reporter(
            move || {
                let (requests, errors) = crate::stream_metrics::totals();
                let open = tunnels.by_id.lock().map_or(0, |t| t.len()) as u64;
                report::Sample {
                    requests,
                    errors,
                    open_connections: open,
                    tunnels_up: open,
                    cache_hit_ratio: None,
                }
            },
            shutdown.now.clone(),
        );
    }
    let mesh_tunnels = if identity.me.transport == skylane_shared::membership::Transport::Wireguard
    {
        crate::wireguard::serve_mesh(
            &socket,
            &identity,
            ctx.clone(),
            streams.clone(),
            shutdown.drain.clone(),
            stop_checks.clone(),
        )?
    } else {
        Vec::new()
    };
    if let (Some(listener), Some(wg)) = (listeners.wireguard, wireguard) {
        tokio::spawn(crate::wireguard::serve(
            listener,
            wg,
            ctx.clone(),
            streams.clone(),
            shutdown.drain.clone(),
        ));
    }
    if let Some(listener) = listeners.admin {
        let status = Arc::new(Status {
            mesh_tunnels: mesh_tunnels.clone(),
            config_name: identity.me.name.clone(),
            node_id: identity.key.id().to_string(),
            socket: socket.clone(),
            tunnels: tunnels.clone(),
            services: services.clone(),
            control: control.clone(),
            draining: draining.clone(),
        });
        tokio::spawn(telemetry::serve_admin(
            listener,
            metrics,
            status,
            admin_token,
            shutdown.now.clone(),
        ));
    }
    // Restart without refusing requests: a successor may take this process's sockets.
    // Once it serves, this one drains (below), and its refusals tell edges to open a new
    // tunnel connection, which reaches the successor.
    let hand_over = skylane_shared::handover::serve_successors(
        handover_point,
        handover_sockets,
        socket.clone(),
        endpoint.clone(),
        generation,
        shutdown.drain.clone(),
    );
    match successor {
        // The endpoint and the services are up: say so, then wait for a successor of
        // this one's own.
        Some(s) => {
            tokio::spawn(skylane_shared::handover::announce_ready(s, hand_over));
        }
        None => {
            tokio::spawn(hand_over);
        }
    }
    tracing::info!(
        node = %identity.me.name,
        id = %identity.key.id(),
        mesh = %socket.udp_addr()?,
        services = service_count,
        "origin connector ready"
    );
    loop {
        let incoming = tokio::select! {
            _ = shutdown.drain.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let ctx = ctx.clone();
        let tunnels = tunnels.clone();
        let streams = streams.clone();
        let members = identity.members.clone();
        let stop = shutdown.now.clone();
        let control = control.clone();
        // The tunnel lives on one shard: quinn spawns its driver where it is accepted, and
        // its streams are spawned there too.
        let tracked = tracker.token();
        shards.spawn_connection(async move {
            let _tracked = tracked;
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "tunnel handshake failed");
                    return;
                }
            };
            // Shared by every stream of the tunnel, so a stream does not copy the name.
            let peer: Arc<str> = trust::peer_node_id(&conn)
                .and_then(|id| members.get(&id).map(|m| Arc::from(m.name.as_str())))
                .unwrap_or_else(|| Arc::from("unknown"));
            control.watch_connection(conn.clone());
            tracing::info!(%peer, "tunnel up");
            metrics::gauge!("skylane_tunnels", "role" => "connector").increment(1.0);
            let id = conn.stable_id();
            if let Ok(mut t) = tunnels.by_id.lock() {
                t.insert(id, (peer.to_string(), conn.clone(), Instant::now()));
            }
            loop {
                let (send, recv) = tokio::select! {
                    _ = stop.cancelled() => break,
                    s = conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::info!(%peer, reason = %e, "tunnel closed");
                            break;
                        }
                    },
                };
                let (send, recv) = skylane_shared::flow::from_quic((send, recv));
                streams.spawn(forward::handle_stream(
                    ctx.clone(),
                    peer.clone(),
                    send,
                    recv,
                ));
            }
            if let Ok(mut t) = tunnels.by_id.lock() {
                t.remove(&id);
            }
            metrics::gauge!("skylane_tunnels", "role" => "connector").decrement(1.0);
        });
    }
    // Drain: refuse new streams (edges fail over to another connector, or to the successor
    // of a hand-over), let in-flight streams finish within the grace period, then close the
    // tunnels.
    // A successor holds the socket (it serves, or a SIGTERM came before it said so): new
    // tunnel connections reach it, so the refusals send edges there.
    if socket.handed_over() {
        restarting.store(true, Ordering::Relaxed);
    }
    draining.cancel();
    streams.close();
    tracing::info!(
        grace_ms = shutdown_grace.as_millis() as u64,
        handed_over = restarting.load(Ordering::Relaxed),
        "draining"
    );
    tokio::select! {
        _ = streams.wait() => tracing::info!("all streams finished"),
        _ = tokio::time::sleep(shutdown_grace) => tracing::warn!("grace period over; closing open streams"),
        _ = shutdown.now.cancelled() => {}
    }
    stop_checks.cancel();
    endpoint.close(0u32.into(), b"connector shutting down");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), endpoint.wait_idle()).await;
    shards.stop();
    Ok(())
}
