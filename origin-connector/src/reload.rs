//! Hot reload of the connector: on SIGHUP, or `origin-connector reload` (`POST /reload`),
//! it reads its config file again and, when it is valid, puts the new `[services]` and log
//! level in force. Streams in flight, upgraded connections and tunnels go on: a stream
//! keeps the service pool it started with, new streams take the new one.
//!
//! A service whose settings did not change keeps its pool — pooled origin connections,
//! health state, flow count. A changed or new one gets a fresh pool and health checks; the
//! health checks of a removed or replaced pool stop. Members may be added, removed or given
//! new addresses: the mesh socket, routing, membership and the tunnel handshakes take the
//! new list (an edge removed can open no new tunnel; its frames are refused). A config that
//! fails validation, or that changes what only a restart can change (identity, what a
//! member is, the mesh and admin listeners, routing, membership, worker threads, the drain
//! time, and the edges of a connector that takes WireGuard), is refused as a whole, and the
//! config in force keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use skylane_shared::reload;
use skylane_shared::resolve::Resolver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config};
use crate::origin::ServicePool;

/// The services in force, by name.
pub type ServiceMap = BTreeMap<String, Arc<ServicePool>>;

/// The services in force, and how to make the next set.
pub struct Services {
    path: PathBuf,
    current: ArcSwap<ServiceMap>,
    /// The health checks of each pool in force, to stop when it is replaced.
    checks: Mutex<HashMap<String, CancellationToken>>,
    in_force: Mutex<Config>,
    generation: std::sync::atomic::AtomicU64,
    resolver: Resolver,
    /// Parent of every pool's health checks (the connector's shutdown).
    stop: CancellationToken,
    tracker: TaskTracker,
    /// The mesh's control loop, which takes a new member list.
    mesh: std::sync::OnceLock<Arc<skylane_shared::mesh::control::MeshControl>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("services", &self.current.load().keys().collect::<Vec<_>>())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    /// The generation now in force.
    pub generation: u64,
    /// What changed: `services.<name>` (added, changed or removed) and `log.level`.
    pub changed: Vec<String>,
}

impl Services {
    /// The services of the config read at start, with their health checks running.
    pub fn start(
        path: PathBuf,
        config: Config,
        resolver: Resolver,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        let configured = config.services.clone();
        let services = Arc::new(Self {
            path,
            current: ArcSwap::from_pointee(ServiceMap::new()),
            checks: Mutex::new(HashMap::new()),
            in_force: Mutex::new(config),
            generation: std::sync::atomic::AtomicU64::new(0),
            resolver,
            stop,
            tracker,
            mesh: std::sync::OnceLock::new(),
        });
        let pools = configured
            .values()
            .map(|s| (s.name.clone(), services.launch(s)))
            .collect();
        services.current.store(Arc::new(pools));
        services
    }

    /// Lets reloads put a new member list in force in the mesh.
    pub fn attach_mesh(&self, control: Arc<skylane_shared::mesh::control::MeshControl>) {
        let _ = self.mesh.set(control);
    }

    /// A pool for `service`, its health checks started.
    fn launch(&self, service: &config::Service) -> Arc<ServicePool> {
        let pool = Arc::new(ServicePool::new(service.clone()));
        let checks = self.stop.child_token();
        pool.spawn_health_checks(self.resolver.clone(), checks.clone(), &self.tracker);
        if let Ok(mut all) = self.checks.lock()
            && let Some(old) = all.insert(service.name.clone(), checks)
        {
            old.cancel();
        }
        pool
    }

    /// The service named `name`, as it is now.
    pub fn get(&self, name: &str) -> Option<Arc<ServicePool>> {
        self.current.load().get(name).cloned()
    }

    /// Every service in force.
    pub fn all(&self) -> Arc<ServiceMap> {
        self.current.load_full()
    }

    /// How many reloads were applied.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the config file again and puts its services and log level in force, or
    /// says why not (nothing is changed then).
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
        let mut restart_only = reload::restart_only_changes(settings(&in_force), settings(&new));
        if !reload::same(&in_force.wireguard, &new.wireguard) {
            restart_only.push("wireguard");
        }
        let takes_wireguard =
            in_force.identity.me.transport == skylane_shared::membership::Transport::Wireguard;
        if takes_wireguard && edges(&in_force) != edges(&new) {
            // One listening tunnel per edge starts with the connector.
            restart_only.push("mesh.members (edges of a connector with transport = \"wireguard\")");
        }
        reload::refuse_restart_only(&self.path, &restart_only)?;
        let members_changed = reload::members_differ(&in_force.identity, &new.identity);
        if members_changed {
            let Some(mesh) = self.mesh.get() else {
                return Err(format!(
                    "{}: mesh.members: the mesh is not running yet",
                    self.path.display()
                ));
            };
            let done = mesh
                .set_members(new.identity.members.clone())
                .map_err(|e| format!("{}: mesh.members: {e}", self.path.display()))?;
            tracing::info!(added = ?done.added, removed = ?done.removed, "member list reloaded");
        }
        if new.log.level != in_force.log.level {
            skylane_shared::telemetry::set_log_level(new.log.level.as_deref())?;
        }
        let old = self.current.load_full();
        let mut changed = Vec::new();
        let mut next = ServiceMap::new();
        for (name, service) in &new.services {
            let kept = old
                .get(name)
                .filter(|pool| reload::same(&pool.service, service))
                .cloned();
            let pool = match kept {
                Some(pool) => pool,
                None => {
                    changed.push(format!("services.{name}"));
                    self.launch(service)
                }
            };
            next.insert(name.clone(), pool);
        }
        for name in old.keys().filter(|n| !new.services.contains_key(*n)) {
            changed.push(format!("services.{name}"));
            if let Ok(mut checks) = self.checks.lock()
                && let Some(c) = checks.remove(name)
            {
                c.cancel();
            }
        }
        if new.log.level != in_force.log.level {
            changed.push("log.level".to_owned());
        }
        if members_changed {
            changed.push("mesh.members".to_owned());
        }
        self.current.store(Arc::new(next));
        *in_force = new;
        let generation = 1 + self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Reloaded {
            generation,
            changed,
        })
    }
}

/// The edges' names, sorted.
fn edges(c: &Config) -> Vec<String> {
    let mut names: Vec<String> = c
        .identity
        .members
        .iter()
        .filter(|m| m.role == skylane_shared::membership::Role::Edge)
        .map(|m| m.name.clone())
        .collect();
    names.sort();
    names
}

/// The node settings of a connector config.
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
