//! The mesh socket's sans-IO core on the virtual network's links.
//!
//! Without it the virtual network hands router datagrams from node to node as they are.
//! With it ([`super::VirtualNet::wired`]), every node owns a real
//! [`MeshCore`](skylane_shared::mesh::MeshCore) with its own key, and every datagram is what
//! the real socket would put on the wire: router datagrams in authenticated frames, data
//! packets (QUIC or WireGuard) framed for the path routing chose, relayed frames judged and
//! sealed again by each relay without being opened. Route changes reach each core's peer
//! table as they reach the real socket. So the framing, the authentication, the replay
//! windows and the relaying are exercised in virtual time, at the scale of the matrix.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use skylane_shared::identity::{NodeKey, ShortId};
use skylane_shared::membership::{Member, Members, Role, Transport};
use skylane_shared::mesh::MeshCore;

/// What an application packet is, as the mesh carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DataKind {
    /// A QUIC packet.
    Quic,
    /// A WireGuard datagram.
    Wireguard,
}

/// A data packet that reached the end of its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Virtual time of arrival, µs.
    pub at_us: u64,
    /// The node it reached.
    pub node: usize,
    /// The node that sent it.
    pub from: usize,
    /// QUIC or WireGuard.
    pub kind: DataKind,
    /// The packet, as sent.
    pub payload: Vec<u8>,
}

/// Why the wire could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A key could not be made or used.
    #[error("node key: {0}")]
    Key(String),
    /// The member list was refused.
    #[error(transparent)]
    Members(#[from] skylane_shared::membership::MembersError),
}

/// One core per node, and how nodes, ids and (made-up) UDP addresses map to each other.
pub struct Wire {
    cores: Vec<MeshCore>,
    shorts: Vec<ShortId>,
    by_short: HashMap<ShortId, usize>,
    addrs: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, usize>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("nodes", &self.cores.len())
            .finish()
    }
}

impl Wire {
    /// `n` nodes, `origin` a connector and the rest edges, each knowing every other's
    /// address (as configured members do).
    pub fn new(n: usize, origin: usize) -> Result<Self, WireError> {
        let keys = (0..n)
            .map(|_| NodeKey::generate().map_err(|e| WireError::Key(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| {
                let [_, _, hi, lo] = (i as u32).to_be_bytes();
                SocketAddr::from((Ipv4Addr::new(10, 77, hi, lo), 7000))
            })
            .collect();
        let members = Members::new(
            keys.iter()
                .enumerate()
                .map(|(i, k)| Member {
                    id: k.id(),
                    name: format!("n{i}"),
                    role: if i == origin {
                        Role::Connector
                    } else {
                        Role::Edge
                    },
                    address: Some(addrs[i].to_string()),
                    region: None,
                    transport: Transport::Quic,
                })
                .collect(),
        )?;
        let cores = keys
            .iter()
            .map(|k| {
                MeshCore::new(k, members.clone(), 1).map_err(|e| WireError::Key(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shorts: Vec<ShortId> = keys.iter().map(|k| k.id().short()).collect();
        for core in &cores {
            for (j, short) in shorts.iter().enumerate() {
                core.peers().set_addr(*short, addrs[j]);
            }
        }
        Ok(Self {
            by_short: shorts.iter().enumerate().map(|(i, s)| (*s, i)).collect(),
            by_addr: addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect(),
            cores,
            shorts,
            addrs,
        })
    }

    /// Node `i`'s core.
    pub fn core(&self, i: usize) -> &MeshCore {
        &self.cores[i]
    }

    /// Node `i`'s short id.
    pub fn short(&self, i: usize) -> ShortId {
        self.shorts[i]
    }

    /// The node with this short id.
    pub fn node_of(&self, short: &ShortId) -> Option<usize> {
        self.by_short.get(short).copied()
    }

    /// Node `i`'s UDP address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// The node at this UDP address.
    pub fn node_at(&self, addr: &SocketAddr) -> Option<usize> {
        self.by_addr.get(addr).copied()
    }

    /// Applies a route change at node `i`: datagrams to `destination` take `path` (node
    /// indices, `i` first), or go direct.
    pub fn set_route(&self, i: usize, destination: usize, path: Option<&[usize]>) {
        let shorts: Option<Vec<ShortId>> =
            path.map(|p| p.iter().map(|&n| self.shorts[n]).collect());
        self.cores[i]
            .peers()
            .set_route(self.shorts[destination], shorts.as_deref());
    }
}
