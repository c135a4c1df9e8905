//! The mesh member list: who may open tunnels, relay, and be relayed to.

use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::{NodeId, ShortId};

/// What a member does in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Terminates users' traffic and dials connectors.
    Edge,
    /// Sits beside the origin and accepts tunnels.
    Connector,
}

/// How edges carry flows to a connector.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// QUIC streams (the default).
    #[default]
    Quic,
    /// TCP connections inside a WireGuard tunnel, over the same mesh paths.
    Wireguard,
}

impl Transport {
    /// Its config and metrics name.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Wireguard => "wireguard",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Edge => "edge",
            Role::Connector => "connector",
        })
    }
}

/// One member of the mesh.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Member {
    /// The member's public key.
    pub id: NodeId,
    /// Operator-facing name (unique in the mesh), used in logs, metrics and the status page.
    pub name: String,
    /// Edge or connector.
    pub role: Role,
    /// Where its mesh socket listens (`host:port`, DNS names allowed), when it is reachable
    /// without being dialled first; edges behind NAT leave this empty.
    pub address: Option<String>,
    /// Region label for operators and the simulator, e.g. `"Sydney"`.
    pub region: Option<String>,
    /// How edges tunnel to it, for a connector.
    pub transport: Transport,
}

/// An immutable, cheaply cloned member list.
#[derive(Clone, Debug, Default)]
pub struct Members {
    inner: Arc<MembersInner>,
}

#[derive(Debug, Default)]
struct MembersInner {
    by_id: HashMap<NodeId, Member>,
    by_short: HashMap<ShortId, NodeId>,
}

/// Errors building a member list.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// Two members share a key.
    #[error("members {0:?} and {1:?} have the same public key")]
    DuplicateKey(String, String),
    /// Two members share a name.
    #[error("two members are named {0:?}")]
    DuplicateName(String),
    /// Two keys share their first 8 bytes, so frames could not tell them apart.
    #[error("members {0:?} and {1:?} have public keys with the same first 8 bytes")]
    ShortIdCollision(String, String),
}

impl Members {
    /// Builds a list, rejecting duplicate keys, names and short ids.
    pub fn new(members: Vec<Member>) -> Result<Self, MembersError> {
        let mut inner = MembersInner::default();
        let mut names = std::collections::HashSet::new();
        for m in members {
            if !names.insert(m.name.clone()) {
                return Err(MembersError::DuplicateName(m.name));
            }
            if let Some(other) = inner.by_id.get(&m.id) {
                return Err(MembersError::DuplicateKey(other.name.clone(), m.name));
            }
            if let Some(other) = inner.by_short.get(&m.id.short()) {
                let other_name = inner
                    .by_id
                    .get(other)
                    .map(|o| o.name.clone())
                    .unwrap_or_default();
                return Err(MembersError::ShortIdCollision(other_name, m.name));
            }
            inner.by_short.insert(m.id.short(), m.id);
            inner.by_id.insert(m.id, m);
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The member with this key.
    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.inner.by_id.get(id)
    }

    /// The member whose key starts with these 8 bytes.
    pub fn by_short(&self, short: &ShortId) -> Option<&Member> {
        self.inner
            .by_short
            .get(short)
            .and_then(|id| self.inner.by_id.get(id))
    }

    /// All members, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.inner.by_id.values()
    }

    /// The member with this name.
    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.inner.by_id.values().find(|m| m.name == name)
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.inner.by_id.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.by_id.is_empty()
    }
}

/// Members `n0`, `n1`, … holding these keys, all edges: the mesh of unit tests.
#[cfg(test)]
pub(crate) fn test_members<'a>(
    keys: impl IntoIterator<Item = &'a crate::identity::NodeKey>,
) -> Members {
    Members::new(
        keys.into_iter()
            .enumerate()
            .map(|(i, k)| Member {
                transport: Transport::Quic,
                id: k.id(),
                name: format!("n{i}"),
                role: Role::Edge,
                address: None,
                region: None,
            })
            .collect(),
    )
    .expect("test members")
}
