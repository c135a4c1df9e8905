//! The control loop: runs the routing core over the mesh socket, and turns its decisions
//! into the paths the socket sends QUIC datagrams on.
//!
//! One task per node. It feeds the [`Router`] the authenticated routing datagrams the
//! socket hands up, runs its timers on tokio's clock, sends what it asks to send, and
//! applies each route change to the socket at once ([`MeshSocket::set_route`]), below the
//! QUIC connections that ride on it. Edges route to every connector; connectors route back
//! to every edge, so each end picks a working path on its own when one dies.
//!
//! Membership runs here too: SWIM ([`Swim`], on foca) over the same authenticated
//! frames. A member SWIM declares down is taken out of routing at once — no path through it
//! is used or probed — and put back when it is up again.
//!
//! It also keeps members' configured addresses resolved, and serves the operator's view
//! ([`MeshControl::status`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::addr::short_id_of;
use super::bulletin::{Bulletin, BulletinError, Stamp, Target};
use super::frame::BodyType;
use super::report::{self, Sample};
use super::socket::{ControlDatagram, MeshSocket};
use crate::identity::ShortId;
use crate::membership::{Members, Role};
use crate::resolve::Resolver;
use crate::routing::{ConfigError, RouteEvent, Router, RouterCounters, RoutingConfig, Timestamp};
use crate::swim::{MemberEvent, MemberView, Swim, SwimConfig, SwimConfigError, SwimCounters};

/// Pauses between the nudges sent after a route change (see `nudge_connections`).
const NUDGE_SCHEDULE_MS: [u64; 5] = [0, 50, 100, 150, 200];

/// How often configured member addresses are resolved again when DNS gives no TTL.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch: the bulletin's clock (stamps are compared across
/// nodes, so they need the wall clock, not a monotonic one).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running control loop of one node.
pub struct MeshControl {
    core: Mutex<Core>,
    /// The bulletin's generation, for readers that react to changes.
    bulletin_changed: tokio::sync::watch::Sender<u64>,
    /// QUIC connections over this socket, nudged when their peer's route changes.
    connections: Mutex<Vec<quinn::Connection>>,
    /// This node's role: routes go to members of the other role.
    role: Role,
    epoch: Instant,
    socket: Arc<MeshSocket>,
    /// The member list in force; a reload replaces it ([`MeshControl::set_members`]).
    members: arc_swap::ArcSwap<Members>,
    /// The destination new flows should go to (routing's nearest, with hysteresis), as
    /// the bytes of its short id; 0: none. Read on every new flow, so kept out of the lock.
    preferred: std::sync::atomic::AtomicU64,
    /// Destinations with a route now, and a signal that moves whenever that changes: a
    /// flow waiting on a destination that lost its last path can give up at once.
    routed: std::sync::RwLock<std::collections::HashSet<ShortId>>,
    routes_changed: tokio::sync::watch::Sender<u64>,
    /// Moves when the member list is replaced.
    members_changed: tokio::sync::watch::Sender<u64>,
}

/// What a new member list changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemberChanges {
    /// Names of the members added.
    pub added: Vec<String>,
    /// Names of the members removed.
    pub removed: Vec<String>,
}

/// Why a new member list was refused.
#[derive(Debug, thiserror::Error)]
pub enum SetMembersError {
    /// This node is not in it (or its key changed).
    #[error("this node is not in the new member list")]
    SelfRemoved,
    /// A member's key gives no link key.
    #[error(transparent)]
    Keys(#[from] crate::mesh::auth::AuthError),
    /// Membership refused the list.
    #[error("membership: {0}")]
    Membership(SwimConfigError),
}

/// Why the control loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The `[routing]` section is invalid.
    #[error(transparent)]
    Routing(#[from] ConfigError),
    /// The `[membership]` section is invalid.
    #[error("membership: {0}")]
    Membership(#[from] SwimConfigError),
}

fn add_to_router(router: &mut Router<ShortId>, now: Timestamp, me: Role, role: Role, id: ShortId) {
    if role == me {
        router.add_peer(now, id);
    } else {
        router.add_destination(now, id);
    }
    // Relays are edges: a path through a connector to another connector (or back to an
    // edge) shares that connector's fate, and a flow that reaches it may as well stay there.
    if role == Role::Connector {
        router.exclude_relay(now, id);
    }
}

impl std::fmt::Debug for MeshControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshControl").finish_non_exhaustive()
    }
}

/// The sans-IO state machines the loop drives.
struct Core {
    router: Router<ShortId>,
    swim: Swim,
    bulletin: Bulletin,
    /// Drives the bulletin's choice of digest peer.
    rng: StdRng,
}

impl Core {
    fn next_deadline(&self) -> Option<Timestamp> {
        match (self.router.poll_timeout(), self.swim.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl MeshControl {
    /// Starts routing over `socket` until `stop` is cancelled. `role` is this node's role:
    /// routes are kept to every member of the other role.
    pub fn start(
        socket: Arc<MeshSocket>,
        role: Role,
        routing: RoutingConfig,
        membership: SwimConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let epoch = Instant::now();
        let me = socket.local_id().short();
        let mut router = Router::new(me, routing, StdRng::from_os_rng(), Timestamp::ZERO)?;
        let members = socket.members().clone();
        for member in members.iter().filter(|m| m.id.short() != me) {
            add_to_router(
                &mut router,
                Timestamp::ZERO,
                role,
                member.role,
                member.id.short(),
            );
        }
        let mut swim = Swim::new(
            me,
            members.iter().map(|m| m.id.short()),
            membership,
            StdRng::from_os_rng(),
            Timestamp::ZERO,
        )?;
        // Literal addresses are known now; DNS names follow from `resolve_members`. SWIM
        // re-announces on its own to members it could not reach yet.
        for member in members.iter().filter(|m| m.id.short() != me) {
            if let Some(addr) = member.address.as_deref().and_then(|a| a.parse().ok()) {
                socket.set_peer_addr(&member.id, addr);
            }
        }
        swim.join(Timestamp::ZERO);
        let mut rng = StdRng::from_os_rng();
        let bulletin = Bulletin::new(me, unix_ms(), &mut rng);
        let control = Arc::new(Self {
            core: Mutex::new(Core {
                router,
                swim,
                bulletin,
                rng,
            }),
            bulletin_changed: tokio::sync::watch::Sender::new(0),
            role,
            connections: Mutex::new(Vec::new()),
            epoch,
            socket: socket.clone(),
            members: arc_swap::ArcSwap::from_pointee(members),
            preferred: std::sync::atomic::AtomicU64::new(0),
            routed: std::sync::RwLock::new(std::collections::HashSet::new()),
            routes_changed: tokio::sync::watch::Sender::new(0),
            members_changed: tokio::sync::watch::Sender::new(0),
        });
        control.flush();
        if let Some(rx) = socket.take_control() {
            tokio::spawn(control.clone().run(rx, stop.clone()));
        }
        tokio::spawn(resolve_members(
            socket,
            control.members_changed.subscribe(),
            stop,
        ));
        Ok(control)
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.epoch.elapsed())
    }

    /// Replaces the member list (a reload): the socket refuses removed members' frames
    /// from the next datagram and accepts added ones'; routing stops probing and routing
    /// to removed members and starts on added ones; membership announces this node to the
    /// added ones. Literal addresses of new or moved members apply at once, DNS names on
    /// the next resolution. This node must stay in the list with the same key.
    pub fn set_members(&self, members: Members) -> Result<MemberChanges, SetMembersError> {
        let me = self.socket.local_id();
        if members.get(&me).is_none() {
            return Err(SetMembersError::SelfRemoved);
        }
        let old = self.members.load_full();
        self.socket.set_members(members.clone())?;
        for m in members.iter().filter(|m| m.id != me) {
            if let Some(addr) = m.address.as_deref().and_then(|a| a.parse().ok()) {
                self.socket.set_peer_addr(&m.id, addr);
            }
        }
        let now = self.now();
        let removed: Vec<_> = old
            .iter()
            .filter(|m| members.get(&m.id).is_none())
            .cloned()
            .collect();
        let added: Vec<_> = members
            .iter()
            .filter(|m| old.get(&m.id).is_none())
            .cloned()
            .collect();
        self.members.store(Arc::new(members.clone()));
        if let Ok(mut core) = self.core.lock() {
            for m in &removed {
                let id = m.id.short();
                core.router.remove_destination(&id);
                core.router.remove_peer(&id);
                self.socket.set_route(id, None);
                self.set_routed(id, false);
            }
            for m in &added {
                add_to_router(&mut core.router, now, self.role, m.role, m.id.short());
            }
            core.swim
                .set_members(now, members.iter().map(|m| m.id.short()))
                .map_err(SetMembersError::Membership)?;
        }
        for m in &removed {
            tracing::info!(member = %m.name, "member removed");
            self.close_connections(m.id.short(), b"removed from the mesh");
        }
        for m in &added {
            tracing::info!(member = %m.name, "member added");
        }
        self.members_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.flush();
        Ok(MemberChanges {
            added: added.into_iter().map(|m| m.name).collect(),
            removed: removed.into_iter().map(|m| m.name).collect(),
        })
    }

    async fn run(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<ControlDatagram>,
        stop: CancellationToken,
    ) {
        loop {
            let (routing, bulletin) = self
                .core
                .lock()
                .ok()
                .map(|c| (c.next_deadline(), c.bulletin.poll_timeout()))
                .unwrap_or((None, u64::MAX));
            let routing = routing
                .map(|t| self.epoch + t.since_epoch())
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            let bulletin = Instant::now()
                + Duration::from_millis(bulletin.saturating_sub(unix_ms()).min(1_000));
            let deadline = routing.min(bulletin);
            tokio::select! {
                _ = stop.cancelled() => return,
                datagram = rx.recv() => {
                    let Some(first) = datagram else { return };
                    self.handle(first);
                    // Take what else is queued before sending, to batch the replies.
                    while let Ok(more) = rx.try_recv() {
                        self.handle(more);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    let peers = self.peer_ids();
                    if let Ok(mut core) = self.core.lock() {
                        core.router.handle_timeout(now);
                        core.swim.handle_timeout(now);
                        let Core { bulletin, rng, .. } = &mut *core;
                        bulletin.handle_timeout(unix_ms(), &peers, rng);
                    }
                }
            }
            self.flush();
        }
    }

    fn handle(&self, datagram: ControlDatagram) {
        let now = self.now();
        let Ok(mut core) = self.core.lock() else {
            return;
        };
        let from = datagram.from;
        let result = match datagram.body_type {
            BodyType::Routing => core
                .router
                .handle_datagram(now, &from, &datagram.body)
                .map_err(|e| e.to_string()),
            BodyType::Swim => core
                .swim
                .handle_datagram(now, from, &datagram.body)
                .map_err(|e| e.to_string()),
            BodyType::Bulletin => core
                .bulletin
                .handle(unix_ms(), from, &datagram.body)
                .map_err(|e| e.to_string()),
            BodyType::Relay
            | BodyType::RelayWireguard
            | BodyType::ToEndpoint
            | BodyType::FromEndpoint => Ok(()),
        };
        if let Err(error) = result {
            tracing::trace!(peer = %from, %error, "control datagram dropped");
        }
    }

    /// Sends what the router wants sent and applies its route changes.
    fn flush(&self) {
        let (transmits, events) = {
            let Ok(mut core) = self.core.lock() else {
                return;
            };
            // Membership changes first: they add or remove routing peers.
            while let Some(event) = core.swim.poll_event() {
                self.membership_changed(&mut core.router, event);
            }
            let mut transmits: Vec<(ShortId, BodyType, Vec<u8>)> =
                std::iter::from_fn(|| core.router.poll_transmit())
                    .map(|t| (t.destination, BodyType::Routing, t.payload))
                    .collect();
            transmits.extend(
                std::iter::from_fn(|| core.swim.poll_transmit())
                    .map(|(to, bytes)| (to, BodyType::Swim, bytes)),
            );
            while let Some((to, bytes)) = core.bulletin.poll_transmit() {
                match to {
                    Target::One(peer) => transmits.push((peer, BodyType::Bulletin, bytes)),
                    Target::All => {
                        for peer in self.peer_ids() {
                            transmits.push((peer, BodyType::Bulletin, bytes.clone()));
                        }
                    }
                }
            }
            let generation = core.bulletin.generation();
            self.bulletin_changed.send_if_modified(|g| {
                let changed = *g != generation;
                *g = generation;
                changed
            });
            let events: Vec<_> = std::iter::from_fn(|| core.router.poll_event()).collect();
            let preferred = core
                .router
                .nearest_destination()
                .map_or(0, |r| u64::from_be_bytes(r.destination.0));
            self.preferred
                .store(preferred, std::sync::atomic::Ordering::Relaxed);
            (transmits, events)
        };
        for (to, body_type, body) in transmits {
            if let Err(e) = self.socket.send_control(&to, body_type, &body) {
                tracing::trace!(peer = %to, error = %e, "control datagram not sent");
            }
        }
        for event in events {
            self.apply(event);
        }
    }

    fn membership_changed(&self, router: &mut Router<ShortId>, event: MemberEvent) {
        let (id, up) = match event {
            MemberEvent::Up(id) => (id, true),
            MemberEvent::Down(id) => (id, false),
        };
        let members = self.members.load();
        let Some(member) = members.by_short(&id) else {
            return;
        };
        if up {
            tracing::info!(member = %member.name, "member up");
            add_to_router(router, Timestamp::ZERO, self.role, member.role, id);
        } else {
            tracing::warn!(member = %member.name, "member down; routing around it");
            router.remove_peer(&id);
            // No route event follows a removal: stop sending along the old path now.
            self.socket.set_route(id, None);
            self.set_routed(id, false);
        }
        metrics::counter!("skylane_mesh_member_changes_total", "change" => if up { "up" } else { "down" })
            .increment(1);
    }

    /// Every other member.
    fn peer_ids(&self) -> Vec<ShortId> {
        let me = self.socket.local_id().short();
        self.members
            .load()
            .iter()
            .map(|m| m.id.short())
            .filter(|id| *id != me)
            .collect()
    }

    /// Writes `key` = `value` on the mesh bulletin for `ttl`: every member holds it within
    /// about one path delay (see [`super::bulletin`]).
    pub fn post(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<Stamp, BulletinError> {
        let stamp = {
            let mut core = self.core.lock().map_err(|_| BulletinError::Full)?;
            core.bulletin
                .post(unix_ms(), key, value, ttl.as_millis() as u64)?
        };
        self.flush();
        Ok(stamp)
    }

    /// Posts this node's report a second after start, then every [`report::INTERVAL`]
    /// until `stop`: its load, from two `sample`s taken that far apart, and the routes it
    /// uses now.
    pub fn spawn_reporter(
        self: &Arc<Self>,
        sample: impl Fn() -> Sample + Send + 'static,
        stop: CancellationToken,
    ) {
        let control = self.clone();
        tokio::spawn(async move {
            let mut before = (Instant::now(), sample());
            let mut wait = Duration::from_secs(1);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = report::INTERVAL;
                let now = (Instant::now(), sample());
                let secs = now.0.duration_since(before.0).as_secs_f64();
                let load = report::load_between(&before.1, &now.1, secs);
                before = now;
                control.post_report(load);
            }
        });
    }

    fn post_report(&self, load: report::Load) {
        let me = self.socket.local_id().short();
        let routes = match self.core.lock() {
            Ok(c) => c
                .router
                .mesh_view(self.now())
                .routes
                .iter()
                .map(|r| r.path.nodes().iter().skip(1).copied().collect())
                .collect(),
            Err(_) => return,
        };
        let value = report::encode(load, routes);
        if let Err(e) = self.post(&report::key_of(&me), value, report::TTL) {
            tracing::debug!(error = %e, "node report not posted");
        }
    }

    /// Reads the bulletin: `f` gets it and the current Unix time in ms.
    pub fn read_bulletin<R>(&self, f: impl FnOnce(&Bulletin, u64) -> R) -> Option<R> {
        let core = self.core.lock().ok()?;
        Some(f(&core.bulletin, unix_ms()))
    }

    /// A receiver that sees the bulletin's generation change whenever its content does.
    pub fn bulletin_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bulletin_changed.subscribe()
    }

    /// Registers a QUIC connection over this node's socket, so a route change towards its
    /// peer is followed by an immediate retransmission instead of a backed-off timer.
    pub fn watch_connection(&self, conn: quinn::Connection) {
        if let Ok(mut conns) = self.connections.lock() {
            conns.retain(|c| c.close_reason().is_none());
            conns.push(conn);
        }
    }

    /// Nudges the connections to `peer` now and a few times over the next half second: the
    /// peer's own route may still point at the dead path for a moment (each end detects the
    /// failure on its own), and each nudge's acknowledgement lets QUIC resend at once what
    /// was lost meanwhile.
    fn nudge_connections(&self, peer: ShortId) {
        let Ok(mut conns) = self.connections.lock() else {
            return;
        };
        conns.retain(|c| c.close_reason().is_none());
        let to_peer: Vec<quinn::Connection> = conns
            .iter()
            .filter(|c| short_id_of(&c.remote_address()) == Some(peer))
            .cloned()
            .collect();
        if to_peer.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for delay_ms in NUDGE_SCHEDULE_MS {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                for conn in &to_peer {
                    crate::quic::nudge(conn);
                }
            }
        });
    }

    /// Closes the QUIC connections to `peer` (it left the member list): its end learns at
    /// once, instead of after the idle timeout, since its frames are refused from now on.
    fn close_connections(&self, peer: ShortId, reason: &[u8]) {
        let Ok(mut conns) = self.connections.lock() else {
            return;
        };
        conns.retain(|c| {
            if short_id_of(&c.remote_address()) == Some(peer) {
                c.close(0u32.into(), reason);
                return false;
            }
            c.close_reason().is_none()
        });
    }

    /// Records whether `destination` has a route, and signals the change.
    fn set_routed(&self, destination: ShortId, routed: bool) {
        if let Ok(mut set) = self.routed.write() {
            let changed = if routed {
                set.insert(destination)
            } else {
                set.remove(&destination)
            };
            if changed {
                self.routes_changed.send_modify(|g| *g += 1);
            }
        }
    }

    /// Whether `destination` has a route now.
    pub fn has_route(&self, destination: &ShortId) -> bool {
        self.routed
            .read()
            .is_ok_and(|set| set.contains(destination))
    }

    /// A receiver that sees a change whenever a destination gains or loses its route.
    pub fn route_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }

    fn apply(&self, event: RouteEvent<ShortId>) {
        self.set_routed(event.destination, event.new.is_some());
        self.socket
            .set_route(event.destination, event.new.as_ref().map(|p| p.nodes()));
        self.nudge_connections(event.destination);
        let names = |p: &Option<crate::routing::Path<ShortId>>| {
            p.as_ref()
                .map(|p| self.path_names(p.nodes()).join(" → "))
                .unwrap_or_else(|| "none".to_owned())
        };
        let reason = format!("{:?}", event.reason).to_lowercase();
        tracing::info!(
            destination = %self.name(&event.destination),
            from = %names(&event.old),
            to = %names(&event.new),
            %reason,
            "route changed"
        );
        metrics::counter!("skylane_route_switches_total", "reason" => reason).increment(1);
    }

    /// Where new flows should go: the destination routing prefers (the nearest healthy
    /// one, switched only when another is clearly cheaper), if any.
    pub fn preferred_destination(&self) -> Option<ShortId> {
        match self.preferred.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            id => Some(ShortId(id.to_be_bytes())),
        }
    }

    /// The name of member `id` (its id when it is not a member).
    pub fn member_name(&self, id: &ShortId) -> String {
        self.name(id)
    }

    fn name(&self, id: &ShortId) -> String {
        self.members
            .load()
            .by_short(id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    fn path_names(&self, nodes: &[ShortId]) -> Vec<String> {
        nodes.iter().map(|n| self.name(n)).collect()
    }

    /// The node's view of the mesh, with members named, for the admin API and
    /// `mesh-node status`.
    pub fn status(&self) -> MeshStatus {
        let now = self.now();
        let (view, counters, liveness, swim, reports) = match self.core.lock() {
            Ok(c) => (
                c.router.mesh_view(now),
                c.router.counters().clone(),
                c.swim.members(),
                c.swim.counters().clone(),
                report::read_all(&c.bulletin, unix_ms()),
            ),
            Err(_) => return MeshStatus::default(),
        };
        let liveness: HashMap<String, MemberView> =
            liveness.into_iter().map(|m| (m.id.clone(), m)).collect();
        let ms = |t: Timestamp| now.saturating_since(t).as_secs_f64();
        let direct: HashMap<ShortId, &crate::routing::view::PathView<ShortId>> = view
            .paths
            .iter()
            .filter(|p| p.path.is_direct())
            .map(|p| (*p.path.destination(), p))
            .collect();
        let me = self.socket.local_id().short();
        let members = self
            .members
            .load()
            .iter()
            .map(|m| {
                let short = m.id.short();
                let path = direct.get(&short);
                let swim = liveness.get(&short.to_string());
                let seen = self.socket.peer_view(&m.id);
                MemberStatus {
                    state: swim.map(|v| format!("{:?}", v.state).to_lowercase()),
                    incarnation: swim.map(|v| v.incarnation),
                    name: m.name.clone(),
                    role: m.role,
                    region: m.region.clone(),
                    id: short.to_string(),
                    this_node: short == me,
                    address: seen.map(|(v, _)| v.addr.to_string()),
                    address_learned: seen.is_some_and(|(v, _)| !v.configured),
                    heard_s_ago: seen.and_then(|(_, ago)| ago).map(|d| d.as_secs_f64()),
                    direct_state: path.map(|p| format!("{:?}", p.state).to_lowercase()),
                    direct_rtt_ms: path.and_then(|p| p.srtt_ms),
                }
            })
            .collect();
        MeshStatus {
            node: self.name(&me),
            members,
            paths: view
                .paths
                .iter()
                .map(|p| PathStatus {
                    path: self.path_names(p.path.nodes()),
                    class: format!("{:?}", p.class).to_lowercase(),
                    state: format!("{:?}", p.state).to_lowercase(),
                    srtt_ms: p.srtt_ms,
                    rttvar_ms: p.rttvar_ms,
                    recent_ms: p.recent_ms,
                    loss: p.loss,
                })
                .collect(),
            links: view
                .links
                .iter()
                .map(|l| LinkStatus {
                    from: self.name(&l.from),
                    to: self.name(&l.to),
                    srtt_ms: l.srtt_ms,
                    recent_ms: l.recent_ms,
                    loss: l.loss,
                    alive: l.alive,
                    version: l.seq,
                    age_s: ms(l.updated_at),
                })
                .collect(),
            routes: view
                .routes
                .iter()
                .map(|r| RouteStatus {
                    destination: self.name(&r.destination),
                    path: self.path_names(r.path.nodes()),
                    cost_ms: r.cost.smoothed_ms,
                    rtt_ms: r.cost.srtt.as_secs_f64() * 1000.0,
                    loss: r.cost.loss,
                    reason: format!("{:?}", r.reason).to_lowercase(),
                    since_s: ms(r.since),
                })
                .collect(),
            preferred_destination: view.preferred_destination.map(|d| self.name(&d)),
            reports: reports
                .into_iter()
                .map(|r| NodeReport {
                    node: self.name(&r.node),
                    age_s: unix_ms().saturating_sub(r.unix_ms) as f64 / 1000.0,
                    load: r.load,
                    routes: r.routes.iter().map(|p| self.path_names(p)).collect(),
                    routes_truncated: r.truncated,
                })
                .collect(),
            counters,
            membership: swim,
        }
    }
}

/// The mesh as one node sees it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct MeshStatus {
    /// This node's name.
    pub node: String,
    /// Every configured member, with what this node measures of its direct link.
    pub members: Vec<MemberStatus>,
    /// Paths this node probes: direct links and relayed candidates.
    pub paths: Vec<PathStatus>,
    /// Every link measurement gossiped through the mesh.
    pub links: Vec<LinkStatus>,
    /// The route chosen to each destination.
    pub routes: Vec<RouteStatus>,
    /// Where new flows go (nearest healthy destination).
    pub preferred_destination: Option<String>,
    /// The latest report of every node that is reporting, this one included (see
    /// [`super::report`]).
    #[serde(default)]
    pub reports: Vec<NodeReport>,
    /// Routing event counters.
    pub counters: RouterCounters,
    /// Membership (SWIM) counters.
    pub membership: SwimCounters,
}

/// A node's latest report, as another node holds it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node: String,
    /// Seconds since it wrote the report (by the two nodes' clocks).
    pub age_s: f64,
    /// Its load over the interval before it.
    pub load: report::Load,
    /// The routes it uses: node names after it, destination last.
    pub routes: Vec<Vec<String>>,
    /// Whether some routes did not fit in the report.
    pub routes_truncated: bool,
}

/// One member.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// Its name.
    pub name: String,
    /// Edge or connector.
    pub role: Role,
    /// Its region label.
    pub region: Option<String>,
    /// Its short id (hex).
    pub id: String,
    /// Whether it is the node reporting.
    pub this_node: bool,
    /// Liveness as membership (SWIM) sees it: alive, suspect or down.
    pub state: Option<String>,
    /// Its SWIM incarnation, bumped each time it refutes a suspicion.
    pub incarnation: Option<u16>,
    /// Where its datagrams go on the direct path.
    pub address: Option<String>,
    /// Whether that address was learned from its authenticated frames (it has none in
    /// the config: behind NAT, or dialling out) rather than configured.
    #[serde(default)]
    pub address_learned: bool,
    /// Seconds since an authenticated frame last came from it.
    #[serde(default)]
    pub heard_s_ago: Option<f64>,
    /// Liveness of the direct path (`up`, `suspect`, `dead`, …), if probed.
    pub direct_state: Option<String>,
    /// Smoothed RTT of the direct path, ms.
    pub direct_rtt_ms: Option<f64>,
}

/// One probed path.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PathStatus {
    /// Node names, this node first.
    pub path: Vec<String>,
    /// Probe cadence: active, standby or idle.
    pub class: String,
    /// Liveness.
    pub state: String,
    /// Smoothed RTT, ms.
    pub srtt_ms: Option<f64>,
    /// RTT variation, ms.
    pub rttvar_ms: f64,
    /// Median of the last few RTTs, ms.
    pub recent_ms: Option<f64>,
    /// Loss fraction over the probe window.
    pub loss: f64,
}

/// One gossiped link measurement.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// The member that measured it.
    pub from: String,
    /// The far end.
    pub to: String,
    /// Smoothed RTT, ms.
    pub srtt_ms: f64,
    /// Recent RTT, ms.
    pub recent_ms: f64,
    /// Loss fraction.
    pub loss: f64,
    /// Whether the measuring member considers it alive.
    pub alive: bool,
    /// Version of the measuring member's record.
    pub version: u64,
    /// Seconds since this node last got an update of it.
    pub age_s: f64,
}

/// The route to one destination.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RouteStatus {
    /// The destination.
    pub destination: String,
    /// Node names, this node first.
    pub path: Vec<String>,
    /// Cost (smoothed RTT plus loss penalty), ms.
    pub cost_ms: f64,
    /// Smoothed RTT, ms.
    pub rtt_ms: f64,
    /// Loss fraction.
    pub loss: f64,
    /// Why this path was chosen: initial, settling, failover or better.
    pub reason: String,
    /// Seconds since it was chosen.
    pub since_s: f64,
}

/// Keeps members' configured DNS names resolved, re-resolving on TTL expiry.
async fn resolve_members(
    socket: Arc<MeshSocket>,
    mut members_changed: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let resolver = Resolver::from_system();
    let me = socket.local_id();
    loop {
        // Read again each round: a reload may have changed the list.
        let targets: Vec<_> = socket
            .members()
            .iter()
            .filter(|m| m.id != me)
            .filter_map(|m| Some((m.id, m.name.clone(), m.address.clone()?)))
            // Literal addresses are set when the list is applied and never expire.
            .filter(|(_, _, address)| address.parse::<std::net::SocketAddr>().is_err())
            .collect();
        let mut next = RESOLVE_EVERY;
        for (id, name, address) in &targets {
            match resolver.resolve(address).await {
                Ok(resolved) => {
                    if let Some(addr) = resolved.addrs.first() {
                        if socket.peer_addr(id) != Some(*addr) {
                            tracing::debug!(member = %name, %addr, "member address resolved");
                        }
                        socket.set_peer_addr(id, *addr);
                    }
                    if let Some(until) = resolved.valid_until {
                        next = next.min(until.saturating_duration_since(std::time::Instant::now()));
                    }
                }
                Err(e) => {
                    tracing::warn!(member = %name, error = %e, "cannot resolve member address");
                    next = next.min(Duration::from_secs(5));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next.max(Duration::from_secs(1))) => {}
            _ = members_changed.changed() => {}
        }
    }
}
