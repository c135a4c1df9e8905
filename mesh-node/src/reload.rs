//! Hot reload: on SIGHUP, or `mesh-node reload` (`POST /reload` on the admin API), the edge
//! reads its config file again and, when it is valid, swaps in a new [`Generation`] —
//! routes and their per-route policy, certificates, rate limits, timeouts, trusted
//! proxies, the challenge, cache rules and the log level — while every open connection
//! and websocket goes on.
//!
//! Each new connection takes the generation in force when it is accepted (its TLS
//! certificates, HTTP settings and timeouts); each request takes the one in force when it
//! arrives (routes, limits, cache rules), so a keep-alive connection follows a reload from
//! its next request on. What carries state lives on across generations: the tunnels, the
//! cache's objects, the flow counts, the "under attack" switches from the mesh, and the
//! rate limiters of zones whose settings did not change.
//!
//! Members may be added, removed or given new addresses: the mesh socket, routing,
//! membership and the tunnels take the new list (tunnels to a removed connector close after
//! the drain time).
//!
//! A config that fails validation, or that changes what only a restart can change (the
//! node's identity, what a member is, listener addresses, the admin listener, tunnels, routing,
//! `[limits]`, the cache's storage, `[acme]`, `[wireguard]`), is refused as a whole: nothing is applied, the reason
//! is logged and answered, and the generation in force keeps serving.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use skylane_shared::reload::{self, same};

use crate::cache::Cache;
use crate::config::{self, Config};
use crate::phases::challenge::Challenger;
use crate::phases::flows::Flows;
use crate::phases::rate_limit::Zones;
use crate::phases::under_attack::UnderAttackState;
use crate::proxy::{Edge, Policy};
use crate::routes::Routes;
use crate::tunnel::TunnelPool;

/// What one config makes of the edge.
pub struct Generation {
    /// Routes, policy and the shared parts.
    pub edge: Arc<Edge>,
    /// The TLS settings with this generation's certificates (when HTTPS is configured).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// HTTP server settings from this generation's limits and timeouts.
    pub http: Arc<auto::Builder<TokioExecutor>>,
    /// How many times the config was reloaded before this generation (0: the first).
    pub number: u64,
}

/// The parts of an edge that outlive a config.
pub struct Carried {
    /// Tunnels to the connectors.
    pub tunnels: Arc<TunnelPool>,
    /// The cache's store.
    pub cache: Option<Arc<Cache>>,
    /// Open flows.
    pub flows: Arc<Flows>,
    /// ACME certificates and challenge answers, if `[acme]` is on.
    pub acme: Option<Arc<crate::acme::Acme>>,
}

/// The generation in force, and how to make the next one.
pub struct Live {
    path: PathBuf,
    current: ArcSwap<Generation>,
    /// The config in force, to compare a new one with.
    in_force: Mutex<Config>,
    carried: Carried,
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    /// The generation now in force.
    pub generation: u64,
    /// The sections that changed, in config terms.
    pub changed: Vec<&'static str>,
}

impl Live {
    /// The first generation, from the config read at start.
    pub fn start(path: PathBuf, config: Config, carried: Carried) -> anyhow::Result<Self> {
        let first = build(&config, &carried, None, 0)?;
        Ok(Self {
            path,
            current: ArcSwap::from_pointee(first),
            in_force: Mutex::new(config),
            carried,
        })
    }

    /// The generation in force.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The edge of the generation in force.
    pub fn edge(&self) -> Arc<Edge> {
        self.current.load().edge.clone()
    }

    /// Reads the config file again and, if it is valid and only changes what a reload
    /// can change, puts it in force. `Err`: why not; the generation in force stays.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let result = self.try_reload();
        reload::record(&result, |r| r.generation, |r| r.changed.join(", "));
        result
    }

    fn try_reload(&self) -> Result<Reloaded, String> {
        let new = config::load(&self.path).map_err(|e| e.to_string())?;
        reload::check_log(&self.path, &new.log)?;
        let mut in_force = self
            .in_force
            .lock()
            .map_err(|_| "the config in force is unreadable".to_owned())?;
        reload::refuse_restart_only(&self.path, &needs_restart(&in_force, &new))?;
        let changed = changes(&in_force, &new);
        let old = self.current.load_full();
        let next = build(&new, &self.carried, Some(&old), old.number + 1)
            .map_err(|e| format!("{}: {e:#}", self.path.display()))?;
        if reload::members_differ(&in_force.identity, &new.identity) {
            let done = self
                .carried
                .tunnels
                .set_members(
                    new.identity.members.clone(),
                    &quic_connectors(&new),
                    new.shutdown_grace,
                )
                .map_err(|e| format!("{}: mesh.members: {e}", self.path.display()))?;
            tracing::info!(added = ?done.added, removed = ?done.removed, "member list reloaded");
        }
        if new.log.level != in_force.log.level {
            skylane_shared::telemetry::set_log_level(new.log.level.as_deref())?;
        }
        let generation = next.number;
        self.current.store(Arc::new(next));
        *in_force = new;
        Ok(Reloaded {
            generation,
            changed,
        })
    }
}

/// Makes a generation of `config`, keeping what `previous` holds that must live on.
fn build(
    config: &Config,
    carried: &Carried,
    previous: Option<&Generation>,
    number: u64,
) -> anyhow::Result<Generation> {
    let ua = &config.under_attack;
    let under_attack = UnderAttackState::new(ua.hosts.clone());
    // The mesh's switches hold across a reload (the bulletin would bring them back within
    // a second, but no request should see them missing).
    let zones = match previous {
        Some(p) => {
            under_attack.set_switches(p.edge.policy.under_attack.switches());
            if same(&p.edge.policy.zones.configured(), &config.rate_limits) {
                p.edge.policy.zones.clone()
            } else {
                Arc::new(Zones::new(&config.rate_limits))
            }
        }
        None => Arc::new(Zones::new(&config.rate_limits)),
    };
    let edge = Arc::new(Edge {
        routes: Routes::new(config.routes.clone()),
        tunnels: carried.tunnels.clone(),
        policy: Policy {
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            client_address: config.client_address.clone(),
            zones,
            flows: carried.flows.clone(),
            challenger: ua.secret.as_ref().map(|s| {
                Challenger::new(s, ua.difficulty_bits, ua.clearance_ttl, ua.challenge_ttl)
            }),
            under_attack,
            auto: ua.auto.clone(),
        },
        cache: carried.cache.clone(),
        acme: carried.acme.clone(),
        cache_rules: Arc::new(
            config
                .cache
                .as_ref()
                .map(|c| c.rules.clone())
                .unwrap_or_default(),
        ),
    });
    let tls = match &config.https {
        Some(https) => Some(Arc::new(
            crate::tls::server_config(https, carried.acme.clone())
                .map_err(|e| anyhow::anyhow!("https.certificates: {e}"))?,
        )),
        None => None,
    };
    Ok(Generation {
        http: Arc::new(crate::server::http_builder(&edge)),
        edge,
        tls,
        number,
    })
}

/// The settings `new` changes that only a restart applies.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    fn settings(c: &Config) -> reload::NodeSettings<'_> {
        reload::NodeSettings {
            identity: &c.identity,
            listen: c.listen,
            worker_threads: c.worker_threads,
            admin: c.admin.as_ref(),
            routing: &c.routing,
            membership: &c.membership,
            shutdown_grace: c.shutdown_grace,
        }
    }
    let storage = |c: &Config| {
        c.cache.as_ref().map(|c| {
            (
                c.memory_bytes,
                c.max_object_bytes,
                c.disk_dir.clone(),
                c.disk_bytes,
                c.coalesce_wait,
                c.max_variants,
            )
        })
    };
    let edge_only = [
        (
            "https.listen",
            old.https.as_ref().map(|h| h.listen) == new.https.as_ref().map(|h| h.listen),
        ),
        (
            "http",
            old.http_redirect == new.http_redirect
                && old.redirect_https_port == new.redirect_https_port,
        ),
        ("tcp", same(&old.tcp, &new.tcp)),
        ("tunnel", same(&old.tunnel, &new.tunnel)),
        ("limits", same(&old.limits, &new.limits)),
        ("the cache's storage", storage(old) == storage(new)),
        ("acme", same(&old.acme, &new.acme)),
        ("wireguard", same_wireguard(old, new)),
        (
            "mesh.members (connectors with transport = \"wireguard\")",
            wireguard_connectors(old) == wireguard_connectors(new),
        ),
    ];
    let mut changed = reload::restart_only_changes(settings(old), settings(new));
    changed.extend(
        edge_only
            .into_iter()
            .filter(|(_, unchanged)| !unchanged)
            .map(|(name, _)| name),
    );
    changed
}

/// The connectors tunnelled to with QUIC (a reload may add or remove those).
fn quic_connectors(c: &Config) -> Vec<skylane_shared::membership::Member> {
    c.connectors
        .iter()
        .filter(|m| m.transport == skylane_shared::membership::Transport::Quic)
        .cloned()
        .collect()
}

/// The names of the connectors tunnelled to with WireGuard over the mesh (their tunnels
/// start with the node: adding or removing one needs a restart).
fn wireguard_connectors(c: &Config) -> Vec<String> {
    let mut names: Vec<String> = c
        .connectors
        .iter()
        .filter(|m| m.transport == skylane_shared::membership::Transport::Wireguard)
        .map(|m| m.name.clone())
        .collect();
    names.sort();
    names
}

/// Whether `[wireguard]` is the same, keys included (their `Debug` is masked).
fn same_wireguard(old: &Config, new: &Config) -> bool {
    match (&old.wireguard, &new.wireguard) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            same(a, b)
                && a.key.same_as(&b.key)
                && a.peers.len() == b.peers.len()
                && a.peers.iter().zip(&b.peers).all(|(x, y)| {
                    match (&x.preshared_key, &y.preshared_key) {
                        (None, None) => true,
                        (Some(p), Some(q)) => p.same_as(q),
                        _ => false,
                    }
                })
        }
        _ => false,
    }
}

/// The reloadable sections `new` changes.
fn changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let certificates = |c: &Config| c.https.as_ref().map(|h| format!("{:?}", h.certificates));
    let secret = |c: &Config| c.under_attack.secret.as_ref().map(|s| s.0.clone());
    let rules = |c: &Config| c.cache.as_ref().map(|c| format!("{:?}", c.rules));
    let checks: [(&'static str, bool); 9] = [
        (
            "mesh.members",
            !reload::members_differ(&old.identity, &new.identity),
        ),
        ("routes", same(&old.routes, &new.routes)),
        // The files may hold new certificates under the same names: always re-read.
        ("https.certificates (re-read)", certificates(old).is_none()),
        ("timeouts", same(&old.timeouts, &new.timeouts)),
        (
            "client_address",
            same(&old.client_address, &new.client_address),
        ),
        ("rate_limits", same(&old.rate_limits, &new.rate_limits)),
        (
            "under_attack",
            same(&old.under_attack, &new.under_attack) && secret(old) == secret(new),
        ),
        ("cache.rules", rules(old) == rules(new)),
        ("log.level", old.log.level == new.log.level),
    ];
    checks
        .into_iter()
        .filter(|(_, unchanged)| !unchanged)
        .map(|(name, _)| name)
        .collect()
}
