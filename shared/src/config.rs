//! Config pieces every binary shares, and loading TOML with errors that name the file
//! and key.
//!
//! Each binary defines its own top-level struct with `deny_unknown_fields`, built from
//! these sections, then validates it into runtime types before binding any port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::{self, NodeId, NodeKey};
use crate::membership::{Member, Members, Role};

/// A config error. Its message names the file and, where it can, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The config file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: String,
        /// toml's message, which includes the line and the key.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// The config file.
        path: String,
        /// The dotted key, e.g. `mesh.members[2].public_key`.
        key: String,
        /// What is wrong and, where it helps, how to fix it.
        message: String,
    },
}

/// Exit code for a bad config or command line (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Reads and parses a TOML file into `T`.
pub fn load_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Helper that builds [`ConfigError::Invalid`] for one file.
#[derive(Clone, Debug)]
pub struct Validator {
    path: PathBuf,
}

impl Validator {
    /// A validator for the config file at `path`; relative paths in it resolve against
    /// the file's directory.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// An error for `key`.
    pub fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub fn relative(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_owned();
        }
        self.path
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_owned())
    }

    /// Checks the `[routing]` and `[membership]` sections every node has.
    pub fn mesh_sections(
        &self,
        routing: &crate::routing::RoutingConfig,
        membership: &crate::swim::SwimConfig,
    ) -> Result<(), ConfigError> {
        routing
            .validate()
            .map_err(|crate::routing::ConfigError::Invalid { key, reason }| {
                self.invalid(format!("routing.{key}"), reason)
            })?;
        membership
            .validate()
            .map_err(|e| self.invalid("membership", e.to_string()))
    }

    /// Reads a secret file (trimmed), at least `min_len` bytes, naming `key` on error.
    pub fn secret_file(
        &self,
        key: &str,
        file: &Path,
        min_len: usize,
    ) -> Result<Secret, ConfigError> {
        let path = self.relative(file);
        let bytes = std::fs::read(&path)
            .map_err(|e| self.invalid(key, format!("{}: {e}", path.display())))?;
        let trimmed = bytes.trim_ascii().to_vec();
        if trimmed.len() < min_len {
            return Err(self.invalid(
                key,
                format!(
                    "{} holds {} bytes; use at least {min_len} random bytes (e.g. `openssl rand -hex 32`)",
                    path.display(),
                    trimmed.len()
                ),
            ));
        }
        Ok(Secret(trimmed))
    }

    /// Checks `[admin]`: a listener off loopback needs a token.
    pub fn admin(&self, section: Option<&AdminSection>) -> Result<Option<Admin>, ConfigError> {
        let Some(a) = section else {
            return Ok(None);
        };
        let token = match &a.token_file {
            Some(f) => Some(self.secret_file("admin.token_file", f, 16)?),
            None => None,
        };
        if token.is_none() && !a.listen.ip().is_loopback() {
            return Err(self.invalid(
                "admin.token_file",
                format!(
                    "the admin listener {} is not on loopback; set a token_file so only operators can use it",
                    a.listen
                ),
            ));
        }
        Ok(Some(Admin {
            listen: a.listen,
            token,
        }))
    }

    /// Checks `value` is in `range`, naming `key` otherwise.
    pub fn in_range(
        &self,
        key: &str,
        value: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                format!(
                    "{value} is out of range ({}..={})",
                    range.start(),
                    range.end()
                ),
            ))
        }
    }
}

/// `[node]`: who this node is and where its mesh socket listens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name; must match its entry in `[[mesh.members]]`.
    pub name: String,
    /// PEM file with the node's Ed25519 private key (`<binary> keygen` writes one).
    pub key_file: PathBuf,
    /// UDP address of the mesh socket, e.g. `0.0.0.0:7000`.
    pub listen: SocketAddr,
    /// Region label shown to operators, e.g. `"Sydney"`.
    pub region: Option<String>,
    /// Threads that serve connections; default (and 0): one per CPU. Each is a shard
    /// ([`crate::shards`]): a thread with a runtime of its own, to which each connection is
    /// pinned with its tasks, so a request does not hand work between threads. 1 runs the
    /// whole node on one thread. The edge's TLS handshakes run on threads of their own (one
    /// per CPU) either way.
    pub worker_threads: Option<u64>,
}

/// `[[mesh.members]]`: one member of the mesh.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSection {
    /// Unique name.
    pub name: String,
    /// `edge` or `connector`.
    pub role: Role,
    /// The member's public key (43 characters of base64url). One of this and
    /// `public_key_file` is required.
    pub public_key: Option<String>,
    /// A file holding the public key (what `keygen` writes as `<key>.pub`).
    pub public_key_file: Option<PathBuf>,
    /// `host:port` of the member's mesh socket, if it can be dialled.
    pub address: Option<String>,
    /// Region label.
    pub region: Option<String>,
    /// For a connector: `quic` (default) or `wireguard`, how every edge tunnels to it.
    #[serde(default)]
    pub transport: crate::membership::Transport,
}

/// `[mesh]`: the member list.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// Every node of the mesh, this one included.
    #[serde(default)]
    pub members: Vec<MemberSection>,
}

/// `[admin]`: the admin listener (metrics, status, health, operator actions).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// TCP address for `/metrics`, `/status`, `/healthz` and the operator's actions.
    /// Keep it on loopback (`127.0.0.1:9101`); any other address needs `token_file`.
    pub listen: SocketAddr,
    /// A file holding the bearer token every admin request must carry
    /// (`Authorization: Bearer <token>`), except `/healthz` and `/readyz`. Required when
    /// `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
}

/// A secret from a file: never printed (`Debug` says `MASKED`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(MASKED)")
    }
}

/// The validated admin listener.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token requests must carry, if any.
    pub token: Option<Secret>,
}

/// `[log]`: logging.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,mesh_node=debug`; `RUST_LOG` overrides.
    pub level: Option<String>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A loaded node identity and member list.
#[derive(Clone, Debug)]
pub struct Identity {
    /// This node's key.
    pub key: NodeKey,
    /// This node's own member entry.
    pub me: Member,
    /// Everyone.
    pub members: Members,
}

/// Loads the node key and member list, checking that this node is a member with `role`.
pub fn load_identity(
    v: &Validator,
    node: &NodeSection,
    mesh: &MeshSection,
    role: Role,
) -> Result<Identity, ConfigError> {
    let key_path = v.relative(&node.key_file);
    let key = NodeKey::load(&key_path).map_err(|e| v.invalid("node.key_file", e.to_string()))?;
    let mut members = Vec::with_capacity(mesh.members.len());
    for (i, m) in mesh.members.iter().enumerate() {
        let at = |k: &str| format!("mesh.members[{i}].{k}");
        let id: NodeId = match (&m.public_key, &m.public_key_file) {
            (Some(k), None) => k
                .parse()
                .map_err(|e: identity::IdentityError| v.invalid(at("public_key"), e.to_string()))?,
            (None, Some(f)) => identity::load_public_key(&v.relative(f))
                .map_err(|e| v.invalid(at("public_key_file"), e.to_string()))?,
            _ => {
                return Err(v.invalid(
                    at("public_key"),
                    "set exactly one of `public_key` and `public_key_file`",
                ));
            }
        };
        if m.transport != crate::membership::Transport::Quic && m.role != Role::Connector {
            return Err(v.invalid(
                at("transport"),
                "only a connector's transport can be chosen",
            ));
        }
        members.push(Member {
            id,
            name: m.name.clone(),
            role: m.role,
            address: m.address.clone(),
            region: m.region.clone(),
            transport: m.transport,
        });
    }
    let members = Members::new(members).map_err(|e| v.invalid("mesh.members", e.to_string()))?;
    let me = members.by_name(&node.name).cloned().ok_or_else(|| {
        v.invalid(
            "node.name",
            format!("{:?} is not in [[mesh.members]]", node.name),
        )
    })?;
    if me.id != key.id() {
        return Err(v.invalid(
            "node.key_file",
            format!(
                "this key's public key is {} but [[mesh.members]] lists {} for {:?}",
                key.id(),
                me.id,
                node.name
            ),
        ));
    }
    if me.role != role {
        return Err(v.invalid(
            "mesh.members",
            format!(
                "{:?} is listed as {} but this binary runs a {role}",
                node.name, me.role
            ),
        ));
    }
    Ok(Identity { key, me, members })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        node: NodeSection,
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("skylane-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("bad.toml");
        std::fs::write(
            &p,
            "[node]\nname = \"a\"\nkey_file = \"k\"\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n",
        )
        .expect("write");
        let err = load_toml::<Sample>(&p).expect_err("must fail").to_string();
        assert!(err.contains("listen_port"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
