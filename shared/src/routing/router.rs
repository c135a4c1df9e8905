//! [`Router`]: the routing state machine one node runs.
//!
//! # Driving it
//!
//! The router owns no socket and no clock. The caller (the mesh socket in the real node, the
//! virtual network in the simulator) drives it like `quinn-proto`:
//!
//! 1. Create it with [`Router::new`], then tell it about members ([`Router::add_peer`]),
//!    connectors ([`Router::add_destination`]) and members that never relay
//!    ([`Router::exclude_relay`]: connectors, with several beside one origin).
//! 2. Whenever a routing datagram arrives from a peer, call [`Router::handle_datagram`].
//! 3. At [`Router::poll_timeout`], call [`Router::handle_timeout`].
//! 4. After any of the calls above, drain [`Router::poll_transmit`] (send each payload to
//!    its `destination` peer over the direct path: probes carry their own source route) and
//!    [`Router::poll_event`] (route changes).
//! 5. Read [`Router::route`] / [`Router::nearest_destination`] to decide where each new
//!    datagram of a flow goes, and [`Router::mesh_view`] for operators.
//!
//! The router also relays other nodes' probes and their replies, so a relayed path is
//! measured end to end through the very relays that would carry its data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;

use super::config::{ConfigError, RoutingConfig};
use super::gossip::{GossipMessage, Gossiper};
use super::linkstate::{LinkMetrics, LinkStateDb};
use super::probe::{ProbeClass, Prober};
use super::route::{
    Candidate, ChosenRoute, CurrentStatus, DestinationRoute, RouteEvent, SwitchReason,
};
use super::select::{CostGraph, LinkCost, PathCost};
use super::stats::{LivenessChange, PathStats};
use super::time::Timestamp;
use super::view::{LinkView, MeshView, PathView};
use super::wire::{DecodeError, Message, NodeKey, Path, ProbeFrame};

/// What a [`Transmit`] carries, for metrics and for the simulator's accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum TransmitKind {
    /// A probe this node originates, or forwards as a relay.
    Probe,
    /// A probe reply this node originates, or forwards as a relay.
    ProbeReply,
    /// Link-state gossip.
    Gossip,
}

/// A datagram to send to a directly connected peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<N> {
    /// The next hop (always sent on the direct path to it).
    pub destination: N,
    /// Encoded [`Message`].
    pub payload: Vec<u8>,
    /// What it is.
    pub kind: TransmitKind,
}

/// Why a received datagram was dropped. Every variant is also counted in
/// [`RouterCounters`].
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The bytes are not a valid routing frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The sender is not a known member; relays only serve members.
    #[error("datagram from a node that is not a mesh member")]
    NotAMember,
    /// A probe or reply whose path does not place this node, or the sender, where they are.
    #[error("probe frame does not match its path")]
    Misrouted,
    /// A reply to no probe we sent (duplicate, forged or too late).
    #[error("reply matches no pending probe")]
    UnknownProbe,
}

/// Counts of notable events, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouterCounters {
    /// Probes this node originated.
    pub probes_sent: u64,
    /// Probes and replies forwarded as a relay.
    pub relayed: u64,
    /// Malformed datagrams dropped.
    pub malformed: u64,
    /// Datagrams from non-members dropped.
    pub not_a_member: u64,
    /// Misrouted probe frames dropped.
    pub misrouted: u64,
    /// Replies matching no pending probe.
    pub unknown_probe: u64,
    /// Link-state deltas this node published about itself.
    pub own_updates: u64,
    /// Gossiped records or entries dropped because they named a non-member or carried a
    /// version out of range.
    pub foreign_records: u64,
}

/// Number of extra candidates computed beyond the standby set.
const EXTRA_CANDIDATES: usize = 3;

/// The routing core of one node. See the module docs for the calling convention.
#[derive(Clone, Debug)]
pub struct Router<N: NodeKey> {
    me: N,
    config: RoutingConfig,
    rng: StdRng,
    peers: BTreeSet<N>,
    /// Every node ever added as a peer or destination, and this node: the mesh members.
    /// Gossip naming anyone else is dropped. Unlike `peers`, a member stays here while it
    /// is down, so its records still travel.
    members: BTreeSet<N>,
    routes: BTreeMap<N, DestinationRoute<N>>,
    /// Members no route goes through ([`Router::exclude_relay`]).
    no_relay: BTreeSet<N>,
    prober: Prober<N>,
    db: LinkStateDb<N>,
    gossiper: Gossiper<N>,
    /// Own link metrics as last published, to publish only significant changes.
    published: BTreeMap<N, LinkMetrics>,
    /// Cost graph built from the link-state db, and the db generation it reflects.
    graph: Option<(u64, CostGraph<N>)>,
    /// Relayed paths probed for some destination, and when they were last wanted.
    relayed_wanted: BTreeMap<Path<N>, Timestamp>,
    next_eval_at: Timestamp,
    preferred: Option<N>,
    transmits: VecDeque<Transmit<N>>,
    events: VecDeque<RouteEvent<N>>,
    counters: RouterCounters,
}

/// How long a relayed path no longer wanted keeps being probed (and keeps its statistics).
const RELAYED_PATH_LINGER_MS: u64 = 30_000;

impl<N: NodeKey> Router<N> {
    /// A router for node `me`. `rng` drives probe jitter, gossip peer choice and switch
    /// jitter; seed it per node (from the OS in production, from the test seed in the
    /// simulator).
    pub fn new(
        me: N,
        config: RoutingConfig,
        mut rng: StdRng,
        now: Timestamp,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let gossiper = Gossiper::new(now, &config, &mut rng);
        Ok(Router {
            me: me.clone(),
            next_eval_at: now + RoutingConfig::ms(config.route_eval_interval_ms),
            config,
            rng,
            peers: BTreeSet::new(),
            members: BTreeSet::from([me.clone()]),
            routes: BTreeMap::new(),
            no_relay: BTreeSet::new(),
            prober: Prober::new(),
            db: LinkStateDb::new(),
            gossiper,
            published: BTreeMap::new(),
            graph: None,
            relayed_wanted: BTreeMap::new(),
            preferred: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: RouterCounters::default(),
        })
    }

    /// This node.
    pub fn me(&self) -> &N {
        &self.me
    }

    /// The configuration in force.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Adds a mesh member: its direct link is probed from now on.
    pub fn add_peer(&mut self, now: Timestamp, peer: N) {
        self.members.insert(peer.clone());
        if peer == self.me || !self.peers.insert(peer.clone()) {
            return;
        }
        if let Ok(path) = Path::direct(self.me.clone(), peer) {
            self.prober
                .set_class(now, &path, ProbeClass::Idle, &self.config, &mut self.rng);
        }
    }

    /// Removes a member (it left or was expelled): its links and routes through it go.
    pub fn remove_peer(&mut self, peer: &N) {
        if !self.peers.remove(peer) {
            return;
        }
        self.prober.retain(|path, _| !path.nodes().contains(peer));
        self.relayed_wanted
            .retain(|path, _| !path.nodes().contains(peer));
        self.db.remove_node(peer);
        self.published.remove(peer);
        self.routes.remove(peer);
        self.no_relay.remove(peer);
        if self.preferred.as_ref() == Some(peer) {
            self.preferred = None;
        }
        // Routes through it are re-evaluated now.
        self.next_eval_at = Timestamp::ZERO;
    }

    /// Adds a destination (a connector) to keep a route to; it is also a peer.
    pub fn add_destination(&mut self, now: Timestamp, destination: N) {
        if destination == self.me {
            return;
        }
        self.add_peer(now, destination.clone());
        self.routes
            .entry(destination.clone())
            .or_insert_with(|| DestinationRoute::new(destination));
        self.next_eval_at = self.next_eval_at.min(now);
    }

    /// No route of this node goes through `peer` as a relay from now on. For connectors when
    /// there are several beside one origin: a path to one connector through another shares
    /// the other's fate, and a flow that can reach the other should simply go there; without
    /// this, a route to a connector that was down can come back through the other one, and
    /// the other's death then costs two failovers instead of one.
    pub fn exclude_relay(&mut self, now: Timestamp, peer: N) {
        if self.no_relay.insert(peer) {
            self.next_eval_at = self.next_eval_at.min(now);
        }
    }

    /// Stops routing to `destination` (it stays a peer).
    pub fn remove_destination(&mut self, destination: &N) {
        self.routes.remove(destination);
        if self.preferred.as_ref() == Some(destination) {
            self.preferred = None;
        }
    }

    /// The route chosen for `destination`, if any.
    pub fn route(&self, destination: &N) -> Option<&ChosenRoute<N>> {
        self.routes.get(destination)?.current()
    }

    /// The route to the nearest healthy destination: where new flows should go. It changes
    /// when the preferred destination loses its route, or another becomes clearly cheaper
    /// (same thresholds as path switches).
    pub fn nearest_destination(&self) -> Option<&ChosenRoute<N>> {
        self.route(self.preferred.as_ref()?)
    }

    /// Statistics of a path this node probes.
    pub fn path_stats(&self, path: &Path<N>) -> Option<&PathStats> {
        self.prober.stats(path)
    }

    /// The link-state database (read-only).
    pub fn link_state(&self) -> &LinkStateDb<N> {
        &self.db
    }

    /// Event counters.
    pub fn counters(&self) -> &RouterCounters {
        &self.counters
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<N>> {
        self.transmits.pop_front()
    }

    /// The next route change.
    pub fn poll_event(&mut self) -> Option<RouteEvent<N>> {
        self.events.pop_front()
    }

    /// When [`Router::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut next = self.next_eval_at.min(self.gossiper.next_deadline());
        if let Some(probe) = self.prober.next_deadline() {
            next = next.min(probe);
        }
        Some(next)
    }

    fn send(&mut self, to: N, message: &Message<N>, kind: TransmitKind) {
        self.transmits.push_back(Transmit {
            destination: to,
            payload: message.encode(),
            kind,
        });
    }

    /// Runs timers due at `now`: probe timeouts, probes, route evaluation, gossip.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let changes = self.prober.handle_timeouts(now, &self.config);
        if changes.iter().any(|(_, c)| *c == LivenessChange::WentDown) {
            self.next_eval_at = now;
        }
        for probe in self.prober.poll_probes(now, &self.config, &mut self.rng) {
            self.counters.probes_sent += 1;
            let to = probe.path.first_hop().clone();
            let frame = ProbeFrame {
                id: probe.id,
                path: probe.path,
                hop: 1,
            };
            self.send(to, &Message::Probe(frame), TransmitKind::Probe);
        }
        if now >= self.next_eval_at {
            self.evaluate(now);
            self.next_eval_at = now + RoutingConfig::ms(self.config.route_eval_interval_ms);
        }
        if now >= self.gossiper.next_deadline() {
            self.publish_own_links(now);
            let peers: Vec<N> = self.gossip_peers();
            let out = self
                .gossiper
                .poll(now, &self.db, &peers, &self.config, &mut self.rng);
            for (to, message) in out {
                self.send(to, &Message::Gossip(message), TransmitKind::Gossip);
            }
        }
    }

    /// Peers whose direct link is not known dead.
    fn gossip_peers(&self) -> Vec<N> {
        self.peers
            .iter()
            .filter(|p| {
                Path::direct(self.me.clone(), (*p).clone())
                    .ok()
                    .and_then(|path| self.prober.stats(&path))
                    .is_none_or(|s| !s.is_dead())
            })
            .cloned()
            .collect()
    }

    /// Publishes own direct links whose measurements moved significantly.
    fn publish_own_links(&mut self, now: Timestamp) {
        let mut changed = Vec::new();
        for peer in &self.peers {
            let Ok(path) = Path::direct(self.me.clone(), peer.clone()) else {
                continue;
            };
            let Some(metrics) = self.prober.stats(&path).and_then(LinkMetrics::from_stats) else {
                continue;
            };
            let significant = self
                .published
                .get(peer)
                .is_none_or(|old| metrics.differs_significantly(old, &self.config));
            if significant {
                changed.push((peer.clone(), metrics));
            }
        }
        if changed.is_empty() {
            return;
        }
        for (peer, metrics) in &changed {
            self.published.insert(peer.clone(), *metrics);
        }
        self.counters.own_updates += 1;
        let update = self.db.publish_own(now, &self.me, changed);
        self.gossiper.push_fresh(update, &self.config);
    }

    /// Handles a routing datagram received from peer `from`.
    pub fn handle_datagram(
        &mut self,
        now: Timestamp,
        from: &N,
        payload: &[u8],
    ) -> Result<(), HandleError> {
        let message = match Message::<N>::decode(payload) {
            Ok(message) => message,
            Err(err) => {
                self.counters.malformed += 1;
                tracing::debug!(peer = ?from, error = %err, "malformed routing datagram");
                return Err(err.into());
            }
        };
        if !self.peers.contains(from) {
            self.counters.not_a_member += 1;
            return Err(HandleError::NotAMember);
        }
        match message {
            Message::Probe(frame) => self.handle_probe(frame, from),
            Message::Pong(frame) => self.handle_pong(now, frame, from),
            Message::Gossip(message) => {
                self.handle_gossip(now, from, message);
                Ok(())
            }
        }
    }

    fn misrouted(&mut self) -> Result<(), HandleError> {
        self.counters.misrouted += 1;
        Err(HandleError::Misrouted)
    }

    fn handle_probe(&mut self, frame: ProbeFrame<N>, from: &N) -> Result<(), HandleError> {
        let nodes = frame.path.nodes();
        let hop = usize::from(frame.hop);
        if hop == 0 || nodes[hop] != self.me || &nodes[hop - 1] != from {
            return self.misrouted();
        }
        if hop == nodes.len() - 1 {
            let back = nodes[hop - 1].clone();
            let reply = ProbeFrame {
                hop: frame.hop - 1,
                ..frame
            };
            self.send(back, &Message::Pong(reply), TransmitKind::ProbeReply);
        } else {
            let next = nodes[hop + 1].clone();
            if !self.peers.contains(&next) {
                return self.misrouted();
            }
            self.counters.relayed += 1;
            let forward = ProbeFrame {
                hop: frame.hop + 1,
                ..frame
            };
            self.send(next, &Message::Probe(forward), TransmitKind::Probe);
        }
        Ok(())
    }

    fn handle_pong(
        &mut self,
        now: Timestamp,
        frame: ProbeFrame<N>,
        from: &N,
    ) -> Result<(), HandleError> {
        let nodes = frame.path.nodes();
        let hop = usize::from(frame.hop);
        if nodes[hop] != self.me || hop + 1 >= nodes.len() || &nodes[hop + 1] != from {
            return self.misrouted();
        }
        if hop > 0 {
            let back = nodes[hop - 1].clone();
            if !self.peers.contains(&back) {
                return self.misrouted();
            }
            self.counters.relayed += 1;
            let forward = ProbeFrame {
                hop: frame.hop - 1,
                ..frame
            };
            self.send(back, &Message::Pong(forward), TransmitKind::ProbeReply);
            return Ok(());
        }
        match self
            .prober
            .handle_reply(now, &frame.path, frame.id, &self.config)
        {
            Ok((_, Some(LivenessChange::CameUp))) => {
                // A revived path may be a better route; look soon, not instantly.
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(_) => {
                self.counters.unknown_probe += 1;
                Err(HandleError::UnknownProbe)
            }
        }
    }

    fn handle_gossip(&mut self, now: Timestamp, from: &N, mut message: GossipMessage<N>) {
        let dropped = message.retain_valid(|n| self.members.contains(n));
        if dropped > 0 {
            self.counters.foreign_records += dropped as u64;
            tracing::debug!(peer = ?from, dropped, "gossip naming non-members or out-of-range versions dropped");
        }
        let output = self
            .gossiper
            .handle(now, &self.me, message, &mut self.db, &self.config);
        for reply in output.replies {
            self.send(from.clone(), &Message::Gossip(reply), TransmitKind::Gossip);
        }
        if let Some(seen) = output.superseded_at {
            let update = self.db.supersede_own(now, &self.me, seen);
            self.gossiper.push_fresh(update, &self.config);
        }
        if output.changed && self.active_route_has_dead_link() {
            self.next_eval_at = now;
        }
    }

    /// Whether a link of some current route is reported dead by gossip.
    fn active_route_has_dead_link(&self) -> bool {
        self.routes
            .values()
            .filter_map(|r| r.current())
            .any(|route| {
                route.path.links().skip(1).any(|(a, b)| {
                    self.db.link(a, b).is_some_and(|m| !m.alive)
                        || self.db.link(b, a).is_some_and(|m| !m.alive)
                })
            })
    }

    /// Merged cost of link a–b from both ends' reports: dead if either says so, else the
    /// mean of what is reported.
    fn reported_link(&self, a: &N, b: &N) -> Option<LinkCost> {
        let reports: Vec<&LinkMetrics> = [self.db.link(a, b), self.db.link(b, a)]
            .into_iter()
            .flatten()
            .collect();
        if reports.is_empty() {
            return None;
        }
        let n = reports.len() as u32;
        Some(LinkCost {
            srtt: reports
                .iter()
                .map(|m| m.srtt())
                .sum::<std::time::Duration>()
                / n,
            recent: reports
                .iter()
                .map(|m| m.recent())
                .sum::<std::time::Duration>()
                / n,
            loss: reports.iter().map(|m| m.loss()).fold(0.0, f64::max),
            alive: reports.iter().all(|m| m.alive),
        })
    }

    /// Brings the cost graph up to date: rebuilt from gossip when the db changed, then this
    /// node's own links overlaid from its fresher direct measurements.
    fn refresh_graph(&mut self) {
        let generation = self.db.generation();
        let stale = !matches!(&self.graph, Some((g, graph)) if *g == generation && graph.nodes().len() == self.peers.len() + 1);
        if stale {
            let mut nodes: Vec<N> = self.peers.iter().cloned().collect();
            nodes.push(self.me.clone());
            let mut graph = CostGraph::new(nodes);
            let n = graph.nodes().len();
            for i in 0..n {
                for j in i + 1..n {
                    let (a, b) = (graph.nodes()[i].clone(), graph.nodes()[j].clone());
                    let cost = self.reported_link(&a, &b);
                    graph.set_index(i, j, cost);
                    graph.set_index(j, i, cost);
                }
            }
            self.graph = Some((generation, graph));
        }
        let mut overlay = Vec::with_capacity(self.peers.len());
        for peer in &self.peers {
            let own = Path::direct(self.me.clone(), peer.clone())
                .ok()
                .and_then(|path| self.prober.stats(&path))
                .and_then(|stats| {
                    Some(LinkCost {
                        srtt: stats.srtt()?,
                        recent: stats.recent_rtt()?,
                        loss: stats.loss(),
                        alive: !stats.is_dead(),
                    })
                });
            let cost = own.or_else(|| self.reported_link(&self.me, peer));
            overlay.push((peer.clone(), cost));
        }
        if let Some((_, graph)) = self.graph.as_mut() {
            for (peer, cost) in overlay {
                graph.set(&self.me, &peer, cost);
                graph.set(&peer, &self.me, cost);
            }
        }
    }

    /// Measured end-to-end cost of a probed path, if verified.
    fn measured(&self, path: &Path<N>, now: Timestamp) -> Option<(PathCost, bool)> {
        let stats = self.prober.stats(path)?;
        let srtt = stats.srtt()?;
        if stats.is_dead() {
            return None;
        }
        let cost = PathCost::new(
            srtt,
            stats.recent_rtt().unwrap_or(srtt),
            stats.loss(),
            &self.config,
        );
        let fresh_ms = 3 * self.config.standby_probe_interval_ms;
        let verified = stats.samples() >= self.config.min_samples_for_switch
            && stats.consecutive_missed() == 0
            && stats
                .last_reply()
                .is_some_and(|t| now.saturating_since(t) <= RoutingConfig::ms(fresh_ms));
        Some((cost, verified))
    }

    /// Re-evaluates every destination's route and the probe classes.
    fn evaluate(&mut self, now: Timestamp) {
        self.refresh_graph();
        let Some((generation, graph)) = self.graph.take() else {
            return;
        };
        let mut wanted: BTreeMap<Path<N>, ProbeClass> = BTreeMap::new();
        let destinations: Vec<N> = self.routes.keys().cloned().collect();
        let no_relay = std::mem::take(&mut self.no_relay);
        let relays_allowed = |relays: &[&N]| !relays.iter().any(|r| no_relay.contains(*r));
        let k = self.config.standby_paths as usize + EXTRA_CANDIDATES;
        for destination in destinations {
            let current_path = self.route(&destination).map(|r| r.path.clone());
            let mut paths: Vec<(Path<N>, PathCost)> = graph.best_paths(
                &self.me,
                &destination,
                self.config.max_relays,
                k,
                &self.config,
                relays_allowed,
            );
            if let Some(current) = &current_path {
                let disjoint = graph.best_paths(
                    &self.me,
                    &destination,
                    self.config.max_relays,
                    1,
                    &self.config,
                    |relays| {
                        relays_allowed(relays)
                            && !relays.iter().any(|r| current.relays().contains(r))
                            && (current.is_direct() || relays.first() != Some(&current.first_hop()))
                    },
                );
                paths.extend(disjoint);
            }
            // Paths already probed towards this destination compete with their measurements.
            for (path, probed) in self.prober.iter() {
                if path.destination() == &destination
                    && (probed.class != ProbeClass::Idle || path.is_direct())
                    && !path.relays().iter().any(|r| no_relay.contains(r))
                    && let Some(cost) = graph.path_cost(path, &self.config)
                {
                    paths.push((path.clone(), cost));
                }
            }
            let mut seen = BTreeSet::new();
            let mut candidates: Vec<Candidate<N>> = Vec::new();
            for (path, estimate) in paths {
                if !seen.insert(path.clone()) {
                    continue;
                }
                let dead_measured = self.prober.stats(&path).is_some_and(|s| s.is_dead());
                if dead_measured {
                    continue;
                }
                let (cost, verified) = self.measured(&path, now).unwrap_or((estimate, false));
                candidates.push(Candidate {
                    path,
                    cost,
                    verified,
                });
            }
            let status = match &current_path {
                None => CurrentStatus {
                    dead: false,
                    cost: None,
                },
                Some(path) => {
                    let probed_dead = self.prober.stats(path).is_some_and(|s| s.is_dead());
                    let link_dead = path
                        .links()
                        .any(|(a, b)| graph.link(a, b).is_some_and(|l| !l.alive));
                    let cost = self
                        .measured(path, now)
                        .map(|(c, _)| c)
                        .or_else(|| graph.path_cost(path, &self.config));
                    CurrentStatus {
                        dead: probed_dead || link_dead,
                        cost,
                    }
                }
            };
            candidates.retain(|c| Some(&c.path) != current_path.as_ref());
            let Some(route) = self.routes.get_mut(&destination) else {
                continue;
            };
            if let Some(event) =
                route.evaluate(now, status, &candidates, &self.config, &mut self.rng)
            {
                tracing::debug!(destination = ?event.destination, old = ?event.old, new = ?event.new, reason = ?event.reason, "route changed");
                self.events.push_back(event);
            }
            // Probe classes: the active path, the direct path, the best alternatives.
            let active = route.current().map(|r| r.path.clone());
            if let Some(active) = &active {
                wanted.insert(active.clone(), ProbeClass::Active);
            }
            if let Ok(direct) = Path::direct(self.me.clone(), destination.clone()) {
                wanted.entry(direct).or_insert(ProbeClass::Standby);
            }
            candidates.sort_by(|a, b| a.cost.smoothed_ms.total_cmp(&b.cost.smoothed_ms));
            let mut standby = 0;
            for candidate in &candidates {
                if Some(&candidate.path) == active.as_ref() || candidate.path.is_direct() {
                    continue;
                }
                if standby >= self.config.standby_paths {
                    break;
                }
                wanted
                    .entry(candidate.path.clone())
                    .or_insert(ProbeClass::Standby);
                standby += 1;
            }
            // And the best path avoiding the active path's relays, for failover.
            if let Some(active) = &active
                && let Some(candidate) = candidates.iter().find(|c| {
                    &c.path != active
                        && !c.path.relays().iter().any(|r| active.relays().contains(r))
                        && (active.is_direct() || c.path.first_hop() != active.first_hop())
                })
            {
                wanted
                    .entry(candidate.path.clone())
                    .or_insert(ProbeClass::Standby);
            }
        }
        self.no_relay = no_relay;
        self.graph = Some((generation, graph));
        self.apply_probe_classes(now, wanted);
        self.update_preferred(now);
    }

    fn apply_probe_classes(&mut self, now: Timestamp, wanted: BTreeMap<Path<N>, ProbeClass>) {
        for (path, class) in &wanted {
            self.prober
                .set_class(now, path, *class, &self.config, &mut self.rng);
            if !path.is_direct() {
                self.relayed_wanted.insert(path.clone(), now);
            }
        }
        let linger = RoutingConfig::ms(RELAYED_PATH_LINGER_MS);
        self.relayed_wanted
            .retain(|_, last| now.saturating_since(*last) <= linger);
        let mut demote = Vec::new();
        for (path, probed) in self.prober.iter() {
            if !wanted.contains_key(path) && probed.class != ProbeClass::Idle {
                demote.push(path.clone());
            }
        }
        for path in demote {
            self.prober
                .set_class(now, &path, ProbeClass::Idle, &self.config, &mut self.rng);
        }
        let relayed_wanted = &self.relayed_wanted;
        self.prober
            .retain(|path, _| path.is_direct() || relayed_wanted.contains_key(path));
    }

    fn update_preferred(&mut self, now: Timestamp) {
        // A destination whose route just failed over may be dying itself: a connector's
        // death kills every path to it, each found dead in turn, and following it from one
        // to the next would hold new flows on it for several failovers. So new flows leave
        // such a destination for the cheapest one whose route is steady, if there is one,
        // without waiting to be clearly beaten.
        let shaken_for = RoutingConfig::ms(self.config.standby_probe_interval_ms * 3);
        let shaken = |r: &ChosenRoute<N>| {
            r.reason == SwitchReason::Failover && now.saturating_since(r.since) < shaken_for
        };
        let cheapest = |steady_only: bool| {
            self.routes
                .values()
                .filter_map(|r| r.current())
                .filter(|r| !(steady_only && shaken(r)))
                .min_by(|a, b| a.cost.smoothed_ms.total_cmp(&b.cost.smoothed_ms))
        };
        if let Some(current) = self.preferred.as_ref().and_then(|p| self.route(p))
            && shaken(current)
            && let Some(steady) = cheapest(true)
        {
            self.preferred = Some(steady.destination.clone());
            return;
        }
        let best = cheapest(false);
        let Some(best) = best else {
            self.preferred = None;
            return;
        };
        let keep = self
            .preferred
            .as_ref()
            .and_then(|p| self.route(p))
            .is_some_and(|current| {
                !best.cost.clearly_beats(
                    &current.cost,
                    self.config.switch_min_gain_ms,
                    self.config.switch_min_gain_percent,
                )
            });
        if !keep {
            self.preferred = Some(best.destination.clone());
        }
    }

    /// This node's view of the whole mesh, for operators.
    pub fn mesh_view(&self, now: Timestamp) -> MeshView<N> {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        MeshView {
            node: self.me.clone(),
            at: now,
            links: self
                .db
                .iter()
                .map(|(from, to, m, seq, updated_at)| LinkView {
                    from: from.clone(),
                    to: to.clone(),
                    srtt_ms: ms(m.srtt()),
                    recent_ms: ms(m.recent()),
                    loss: m.loss(),
                    alive: m.alive,
                    seq,
                    updated_at,
                })
                .collect(),
            paths: self
                .prober
                .iter()
                .map(|(path, probed)| PathView {
                    path: path.clone(),
                    class: probed.class,
                    state: probed.stats.state(),
                    srtt_ms: probed.stats.srtt().map(ms),
                    rttvar_ms: ms(probed.stats.rttvar()),
                    recent_ms: probed.stats.recent_rtt().map(ms),
                    loss: probed.stats.loss(),
                })
                .collect(),
            routes: self
                .routes
                .values()
                .filter_map(|r| r.current().cloned())
                .collect(),
            preferred_destination: self.preferred.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::gossip::MAX_SEQ;
    use crate::routing::linkstate::LinkUpdate;
    use crate::routing::route::SwitchReason;
    use crate::routing::wire::PeerIndex;
    use rand::SeedableRng;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    /// A minimal in-memory mesh with fixed RTTs and a fake clock that jumps to the next
    /// event, in the spirit of quinn-proto's `Pair`. The full simulator lives in
    /// `skylane-simulations`.
    /// (delivery time, tie-breaker, from, to, payload).
    type InFlight = (Timestamp, u64, usize, usize, Vec<u8>);

    struct Mesh {
        routers: Vec<Router<PeerIndex>>,
        rtt_ms: Vec<Vec<u64>>,
        down: Vec<bool>,
        queue: BinaryHeap<Reverse<InFlight>>,
        seq: u64,
        now: Timestamp,
    }

    impl Mesh {
        fn new(rtt_ms: Vec<Vec<u64>>, destination: u16) -> Self {
            let n = rtt_ms.len();
            let routers = (0..n)
                .map(|i| {
                    let rng = StdRng::seed_from_u64(i as u64);
                    let mut r = Router::new(
                        PeerIndex(i as u16),
                        RoutingConfig::default(),
                        rng,
                        Timestamp::ZERO,
                    )
                    .expect("valid config");
                    for j in 0..n {
                        r.add_peer(Timestamp::ZERO, PeerIndex(j as u16));
                    }
                    if i != usize::from(destination) {
                        r.add_destination(Timestamp::ZERO, PeerIndex(destination));
                    }
                    r
                })
                .collect();
            Mesh {
                routers,
                rtt_ms,
                down: vec![false; n],
                queue: BinaryHeap::new(),
                seq: 0,
                now: Timestamp::ZERO,
            }
        }

        fn flush(&mut self, i: usize) {
            while let Some(t) = self.routers[i].poll_transmit() {
                let j = usize::from(t.destination.0);
                let at = self.now + Duration::from_micros(self.rtt_ms[i][j] * 500);
                self.seq += 1;
                self.queue.push(Reverse((at, self.seq, i, j, t.payload)));
            }
        }

        fn run_until(&mut self, until: Timestamp) {
            loop {
                let timer = (0..self.routers.len())
                    .filter(|&i| !self.down[i])
                    .filter_map(|i| self.routers[i].poll_timeout().map(|t| (t, i)))
                    .min();
                let packet = self.queue.peek().map(|Reverse(p)| p.0);
                let next = match (timer, packet) {
                    (Some((t, _)), Some(p)) => t.min(p),
                    (Some((t, _)), None) => t,
                    (None, Some(p)) => p,
                    (None, None) => break,
                };
                if next > until {
                    break;
                }
                self.now = next;
                if packet == Some(next) {
                    if let Some(Reverse((_, _, from, to, bytes))) = self.queue.pop()
                        && !self.down[to]
                        && !self.down[from]
                    {
                        let _ =
                            self.routers[to].handle_datagram(next, &PeerIndex(from as u16), &bytes);
                        self.flush(to);
                    }
                } else if let Some((_, i)) = timer {
                    self.routers[i].handle_timeout(next);
                    self.flush(i);
                }
            }
            self.now = until;
        }
    }

    fn nodes(path: &Path<PeerIndex>) -> Vec<u16> {
        path.nodes().iter().map(|n| n.0).collect()
    }

    /// 0 is an edge, 3 the destination; 0–3 directly is slow, through 1 it is fast, 2 is a
    /// worse relay.
    fn triangle() -> Vec<Vec<u64>> {
        vec![
            vec![0, 40, 60, 200],
            vec![40, 0, 50, 60],
            vec![60, 50, 0, 90],
            vec![200, 60, 90, 0],
        ]
    }

    #[test]
    fn picks_the_relay_when_the_triangle_inequality_breaks() {
        let mut mesh = Mesh::new(triangle(), 3);
        mesh.run_until(Timestamp::from_millis(20_000));
        let route = mesh.routers[0].route(&PeerIndex(3)).expect("route");
        assert_eq!(nodes(&route.path), vec![0, 1, 3]);
        assert!(
            (route.cost.srtt.as_millis() as i64 - 100).abs() <= 2,
            "{:?}",
            route.cost
        );
        // Every node learned every link, including ones it cannot measure.
        let view = mesh.routers[0].mesh_view(mesh.now);
        assert!(
            view.links
                .iter()
                .any(|l| l.from == PeerIndex(1) && l.to == PeerIndex(2))
        );
        assert_eq!(view.preferred_destination, Some(PeerIndex(3)));
        assert!(serde_json::to_string(&view).is_ok());
    }

    #[test]
    fn relay_crash_fails_over_within_a_second() {
        let mut mesh = Mesh::new(triangle(), 3);
        mesh.run_until(Timestamp::from_millis(60_000));
        while mesh.routers[0].poll_event().is_some() {}
        mesh.down[1] = true;
        mesh.run_until(Timestamp::from_millis(61_000));
        let route = mesh.routers[0].route(&PeerIndex(3)).expect("route");
        assert_ne!(nodes(&route.path), vec![0, 1, 3]);
        assert!(!route.path.nodes().contains(&PeerIndex(1)));
        let event = mesh.routers[0].poll_event().expect("event");
        assert_eq!(event.reason, SwitchReason::Failover);
    }

    #[test]
    fn malformed_and_foreign_datagrams_are_counted() {
        let mut mesh = Mesh::new(triangle(), 3);
        let r = &mut mesh.routers[0];
        assert!(matches!(
            r.handle_datagram(Timestamp::ZERO, &PeerIndex(1), &[0xff, 0x00]),
            Err(HandleError::Decode(_))
        ));
        let probe = Message::Probe(ProbeFrame {
            id: 1,
            path: Path::new(vec![PeerIndex(7), PeerIndex(0)]).expect("path"),
            hop: 1,
        });
        assert!(matches!(
            r.handle_datagram(Timestamp::ZERO, &PeerIndex(7), &probe.encode()),
            Err(HandleError::NotAMember)
        ));
        let misrouted = Message::Probe(ProbeFrame {
            id: 1,
            path: Path::new(vec![PeerIndex(1), PeerIndex(2)]).expect("path"),
            hop: 1,
        });
        assert!(matches!(
            r.handle_datagram(Timestamp::ZERO, &PeerIndex(1), &misrouted.encode()),
            Err(HandleError::Misrouted)
        ));
        let pong = Message::Pong(ProbeFrame {
            id: 99,
            path: Path::new(vec![PeerIndex(0), PeerIndex(1)]).expect("path"),
            hop: 0,
        });
        assert!(matches!(
            r.handle_datagram(Timestamp::ZERO, &PeerIndex(1), &pong.encode()),
            Err(HandleError::UnknownProbe)
        ));
        let c = r.counters();
        assert_eq!(
            (c.malformed, c.not_a_member, c.misrouted, c.unknown_probe),
            (1, 1, 1, 1)
        );
    }

    fn gossip(message: GossipMessage<PeerIndex>) -> Vec<u8> {
        Message::Gossip(message).encode()
    }

    #[test]
    fn gossip_about_non_members_is_neither_stored_nor_passed_on() {
        let mut mesh = Mesh::new(triangle(), 3);
        let metrics = LinkMetrics {
            srtt_us: 1_000,
            recent_us: 1_000,
            loss_permille: 0,
            alive: true,
        };
        let stranger = PeerIndex(9);
        let push = gossip(GossipMessage::Push {
            updates: vec![
                // A record of a stranger, and a member's record naming a stranger.
                LinkUpdate {
                    origin: stranger,
                    base_seq: 0,
                    seq: 1,
                    links: vec![(PeerIndex(1), metrics)],
                },
                LinkUpdate {
                    origin: PeerIndex(2),
                    base_seq: 0,
                    seq: 7,
                    links: vec![(stranger, metrics), (PeerIndex(1), metrics)],
                },
            ],
        });
        let r = &mut mesh.routers[0];
        r.handle_datagram(Timestamp::ZERO, &PeerIndex(1), &push)
            .expect("handled");
        assert_eq!(r.link_state().version(&stranger), 0);
        assert!(r.link_state().link(&PeerIndex(2), &stranger).is_none());
        assert!(r.link_state().link(&PeerIndex(2), &PeerIndex(1)).is_some());
        assert_eq!(r.counters().foreign_records, 2);
        // What it passes on names members only.
        mesh.flush(0);
        mesh.run_until(Timestamp::from_millis(3_000));
        for router in &mesh.routers {
            assert_eq!(router.link_state().version(&stranger), 0);
            assert!(router.link_state().link(&PeerIndex(2), &stranger).is_none());
        }
    }

    #[test]
    fn a_digest_claiming_the_largest_version_changes_nothing() {
        let mut mesh = Mesh::new(triangle(), 3);
        mesh.run_until(Timestamp::from_millis(5_000));
        let mine = mesh.routers[0].link_state().version(&PeerIndex(0));
        assert!(mine > 0);
        for hostile in [u64::MAX, MAX_SEQ + 1] {
            let digest = gossip(GossipMessage::Digest {
                versions: vec![(PeerIndex(0), hostile), (PeerIndex(2), hostile)],
                reply: false,
                complete: true,
            });
            mesh.routers[0]
                .handle_datagram(mesh.now, &PeerIndex(1), &digest)
                .expect("handled");
            let push = gossip(GossipMessage::Push {
                updates: vec![LinkUpdate {
                    origin: PeerIndex(0),
                    base_seq: 0,
                    seq: hostile,
                    links: Vec::new(),
                }],
            });
            mesh.routers[0]
                .handle_datagram(mesh.now, &PeerIndex(1), &push)
                .expect("handled");
        }
        // Our own record did not jump to (or wrap around) the claimed version, and the
        // mesh keeps converging on it.
        let after = mesh.routers[0].link_state().version(&PeerIndex(0));
        assert!(after < MAX_SEQ, "{after}");
        mesh.run_until(Timestamp::from_millis(20_000));
        assert!(mesh.routers[0].route(&PeerIndex(3)).is_some());
        assert!(mesh.routers[0].counters().foreign_records >= 4);
    }
}
