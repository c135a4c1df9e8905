//! What both binaries' hot reloads share: the settings only a restart applies, the log-level
//! check, and how an applied or refused reload is logged and counted.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config::{Admin, Identity, LogSection};
use crate::routing::RoutingConfig;
use crate::swim::SwimConfig;

/// The settings every node has that a reload cannot change.
#[derive(Clone, Copy, Debug)]
pub struct NodeSettings<'a> {
    /// Key, own entry, members.
    pub identity: &'a Identity,
    /// The mesh socket's address.
    pub listen: SocketAddr,
    /// Runtime threads.
    pub worker_threads: Option<usize>,
    /// The admin listener.
    pub admin: Option<&'a Admin>,
    /// `[routing]`.
    pub routing: &'a RoutingConfig,
    /// `[membership]`.
    pub membership: &'a SwimConfig,
    /// The drain time.
    pub shutdown_grace: Duration,
}

/// Whether two values print the same: the config types are plain data whose `Debug`
/// shows every field (secrets masked, so those are compared on their own).
pub fn same(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Whether the member lists differ at all (they are kept in hash maps, so compared as
/// sorted text).
pub fn members_differ(old: &Identity, new: &Identity) -> bool {
    let text = |i: &Identity| {
        let mut m: Vec<String> = i.members.iter().map(|m| format!("{m:?}")).collect();
        m.sort();
        m
    };
    text(old) != text(new)
}

/// Whether every member in both lists kept its key, role and transport: adding, removing
/// and re-addressing members is reloaded; changing what a member is needs a restart.
fn members_kept_what_they_are(old: &Identity, new: &Identity) -> bool {
    old.members
        .iter()
        .all(|o| match new.members.by_name(&o.name) {
            None => true,
            Some(n) => n.id == o.id && n.role == o.role && n.transport == o.transport,
        })
        && new.members.iter().all(|n| {
            // A new name for a key already in the list is a rename: restart too.
            old.members.get(&n.id).is_none_or(|o| o.name == n.name)
        })
}

/// The node settings `new` changes, by config key: each needs a restart.
pub fn restart_only_changes(old: NodeSettings<'_>, new: NodeSettings<'_>) -> Vec<&'static str> {
    let admin = |s: &NodeSettings<'_>| {
        s.admin
            .map(|a| (a.listen, a.token.as_ref().map(|t| t.0.clone())))
    };
    let checks = [
        (
            "node.name and node.key_file",
            old.identity.me.name == new.identity.me.name
                && old.identity.key.id() == new.identity.key.id(),
        ),
        ("node.listen", old.listen == new.listen),
        (
            "node.worker_threads",
            old.worker_threads == new.worker_threads,
        ),
        (
            "mesh.members (a member's key, name, role or transport)",
            members_kept_what_they_are(old.identity, new.identity),
        ),
        ("admin", admin(&old) == admin(&new)),
        (
            "routing and membership",
            same(old.routing, new.routing) && same(old.membership, new.membership),
        ),
        (
            "shutdown_grace_ms",
            old.shutdown_grace == new.shutdown_grace,
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, unchanged)| !unchanged)
        .map(|(name, _)| name)
        .collect()
}

/// Checks a new config's `[log] level` before anything is applied.
pub fn check_log(path: &Path, log: &LogSection) -> Result<(), String> {
    match &log.level {
        Some(level) => crate::telemetry::check_log_level(level)
            .map_err(|e| format!("{}: log.level: {e}", path.display())),
        None => Ok(()),
    }
}

/// The refusal of a config that changes `restart`: `Ok` when it changes none of those.
pub fn refuse_restart_only(path: &Path, restart: &[&str]) -> Result<(), String> {
    if restart.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: {} only take effect on a restart; nothing was changed",
            path.display(),
            restart.join(", ")
        ))
    }
}

/// Logs and counts (`skylane_config_reloads_total{result}`) what a reload did: the
/// generation now in force and what changed, or why it was refused.
pub fn record<T>(
    result: &Result<T, String>,
    generation: impl Fn(&T) -> u64,
    changed: impl Fn(&T) -> String,
) {
    match result {
        Ok(r) => {
            tracing::info!(generation = generation(r), changed = %changed(r), "config reloaded");
            metrics::counter!("skylane_config_reloads_total", "result" => "applied").increment(1);
        }
        Err(why) => {
            tracing::error!(reason = %why, "config reload refused; the config in force keeps serving");
            metrics::counter!("skylane_config_reloads_total", "result" => "refused").increment(1);
        }
    }
}
