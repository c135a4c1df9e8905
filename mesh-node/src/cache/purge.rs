//! Purges: by URL, by URL prefix, by `Cache-Tag`, or everything — written once, applied by
//! every edge of the mesh.
//!
//! A purge is an entry `purge/<id>` on the mesh bulletin (see
//! `skylane_shared::mesh::bulletin`), kept for [`PURGE_TTL`] so an edge that was briefly
//! away still applies it. Each edge applies each purge once, to the objects stored before
//! the purge was issued (an object fetched after it is already new).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Cache;
use super::key::url_of;
use super::object::Object;

/// Bulletin key prefix of purges.
pub const KEY_PREFIX: &str = "purge/";
/// How long a purge stays on the bulletin.
pub const PURGE_TTL: Duration = Duration::from_secs(600);

/// What a purge removes.
/// (Externally tagged, serde's default: postcard, the bulletin's encoding, cannot decode
/// internally or adjacently tagged enums.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// One URL: `host/path?query` (every variant of it).
    Url(String),
    /// Every URL starting with `host/prefix`.
    Prefix(String),
    /// Every object with this `Cache-Tag`.
    Tag(String),
    /// Everything.
    Everything,
}

/// A purge as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    /// What it removes.
    pub target: Target,
    /// When it was issued (Unix ms): objects stored before it go.
    pub issued_unix_ms: u64,
}

/// A purge this edge applied, for `/status` and for timing purges across the mesh.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    /// Its bulletin id.
    pub id: String,
    /// What it removed.
    pub target: Target,
    /// When it was issued.
    pub issued_unix_ms: u64,
    /// When this edge applied it.
    pub applied_unix_ms: u64,
    /// Objects it removed here.
    pub removed: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Target {
    /// Parses an operator's target: `url` and `prefix` take `host/path` (a scheme is
    /// dropped), `tag` a tag, `everything` nothing.
    pub fn parse(kind: &str, value: Option<&str>) -> Result<Target, String> {
        let value = value.map(|v| {
            v.trim()
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .to_owned()
        });
        let need = |v: Option<String>| {
            v.filter(|v| !v.is_empty() && v.len() <= 2048)
                .ok_or_else(|| format!("purge by {kind} needs a value"))
        };
        match kind {
            "url" => Ok(Target::Url(lowercase_host(&need(value)?))),
            "prefix" => Ok(Target::Prefix(lowercase_host(&need(value)?))),
            "tag" => Ok(Target::Tag(need(value)?)),
            "everything" => Ok(Target::Everything),
            other => Err(format!(
                "{other:?}: purge by url, prefix, tag or everything"
            )),
        }
    }

    /// Whether the object stored under `key` is a target.
    pub fn matches(&self, key: &str, obj: &Object) -> bool {
        match self {
            Target::Url(u) => url_of(key) == u,
            Target::Prefix(p) => url_of(key).starts_with(p.as_str()),
            Target::Tag(t) => obj.tags.iter().any(|x| x == t),
            Target::Everything => true,
        }
    }
}

/// Host names are case-insensitive; paths are not.
fn lowercase_host(v: &str) -> String {
    match v.split_once('/') {
        Some((host, rest)) => format!("{}/{rest}", host.to_ascii_lowercase()),
        None => v.to_ascii_lowercase(),
    }
}

impl Cache {
    /// Applies purge `id` unless this edge did already; returns the objects it removed.
    pub fn apply_purge(&self, id: &str, purge: &Purge) -> Option<u64> {
        {
            let applied = self.applied_purges.lock().ok()?;
            if applied.contains_key(id) {
                return None;
            }
        }
        let issued = SystemTime::UNIX_EPOCH + Duration::from_millis(purge.issued_unix_ms);
        let removed =
            self.remove_where(|key, obj| obj.stored <= issued && purge.target.matches(key, obj));
        metrics::counter!("skylane_cache_purged_objects_total").increment(removed);
        if let Ok(mut applied) = self.applied_purges.lock() {
            applied.insert(
                id.to_owned(),
                Applied {
                    id: id.to_owned(),
                    target: purge.target.clone(),
                    issued_unix_ms: purge.issued_unix_ms,
                    applied_unix_ms: unix_ms(SystemTime::now()),
                    removed,
                },
            );
        }
        tracing::info!(id, target = ?purge.target, removed, "cache purge applied");
        Some(removed)
    }

    /// Forgets applied purges that left the bulletin (`live` holds the ids still on it).
    pub fn forget_purges(&self, live: &std::collections::HashSet<String>) {
        if let Ok(mut applied) = self.applied_purges.lock() {
            applied.retain(|id, _| live.contains(id));
        }
    }
}

/// A new purge of `target`, issued now.
pub fn new_purge(target: Target) -> (String, Purge) {
    let id: u64 = rand::random();
    (
        format!("{id:016x}"),
        Purge {
            target,
            issued_unix_ms: unix_ms(SystemTime::now()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_match() {
        assert_eq!(
            Target::parse("url", Some("https://A.example/x?y=1")),
            Ok(Target::Url("a.example/x?y=1".into()))
        );
        assert_eq!(
            Target::parse("prefix", Some("a.example/static/")),
            Ok(Target::Prefix("a.example/static/".into()))
        );
        assert_eq!(Target::parse("everything", None), Ok(Target::Everything));
        assert!(Target::parse("tag", None).is_err());
        assert!(Target::parse("regex", Some("x")).is_err());
        let (id, p) = new_purge(Target::Tag("t".into()));
        assert_eq!(id.len(), 16);
        assert!(p.issued_unix_ms > 0);
        let json = serde_json::to_string(&p.target).expect("json");
        assert_eq!(json, r#"{"tag":"t"}"#);
        // The bulletin carries purges as postcard: they must come back.
        let wire = postcard::to_stdvec(&p).expect("encode");
        assert_eq!(postcard::from_bytes::<Purge>(&wire).expect("decode"), p);
    }
}
