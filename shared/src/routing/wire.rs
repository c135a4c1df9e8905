//! Datagrams exchanged by routers: probes, their replies, and gossip.
//!
//! Frames are serde types encoded with postcard (varints, no field names), so a probe is a
//! few bytes plus its path. A probe is source-routed: it carries the whole path and the
//! index of the hop it is addressed to, so relays need no routing state to forward it and
//! the reply retraces the same path backwards. Decoding validates everything that came from
//! the network; a malformed frame is an error value, never a panic.

use std::fmt::Debug;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::gossip::GossipMessage;

/// What the routing core needs of a node identity. Blanket-implemented: the real node plugs
/// in its own `NodeId`, the simulator uses [`PeerIndex`].
pub trait NodeKey: Ord + Hash + Clone + Debug + Serialize + DeserializeOwned {}

impl<T: Ord + Hash + Clone + Debug + Serialize + DeserializeOwned> NodeKey for T {}

/// A small node identity: an index into a table of mesh members (simulator, tests).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct PeerIndex(pub u16);

/// Maximum number of nodes on a path: source, two relays, destination.
pub const MAX_PATH_NODES: usize = 4;

/// A loop-free sequence of nodes from a source to a destination, with at most two relays
/// in between. The first element is the node that probes or sends on the path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<N>", into = "Vec<N>")]
#[serde(bound(deserialize = "N: NodeKey", serialize = "N: NodeKey"))]
pub struct Path<N>(Vec<N>);

/// Why a sequence of nodes is not a [`Path`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Fewer than two or more than four nodes.
    #[error("a path has 2 to {MAX_PATH_NODES} nodes, got {0}")]
    Length(usize),
    /// A node appears twice.
    #[error("a path must not visit a node twice")]
    Loop,
}

impl<N: NodeKey> Path<N> {
    /// Builds a path from its nodes, source first.
    pub fn new(nodes: Vec<N>) -> Result<Self, PathError> {
        if !(2..=MAX_PATH_NODES).contains(&nodes.len()) {
            return Err(PathError::Length(nodes.len()));
        }
        for (i, a) in nodes.iter().enumerate() {
            if nodes[i + 1..].contains(a) {
                return Err(PathError::Loop);
            }
        }
        Ok(Path(nodes))
    }

    /// The direct path from `from` to `to` (`from != to`).
    pub fn direct(from: N, to: N) -> Result<Self, PathError> {
        Path::new(vec![from, to])
    }

    /// All nodes, source first.
    pub fn nodes(&self) -> &[N] {
        &self.0
    }

    /// The node that sends on this path.
    pub fn source(&self) -> &N {
        &self.0[0]
    }

    /// The far end of the path.
    pub fn destination(&self) -> &N {
        &self.0[self.0.len() - 1]
    }

    /// The nodes strictly between source and destination.
    pub fn relays(&self) -> &[N] {
        &self.0[1..self.0.len() - 1]
    }

    /// The node a datagram on this path is first sent to.
    pub fn first_hop(&self) -> &N {
        &self.0[1]
    }

    /// True for the direct path (no relay).
    pub fn is_direct(&self) -> bool {
        self.0.len() == 2
    }

    /// Consecutive node pairs (links) along the path.
    pub fn links(&self) -> impl Iterator<Item = (&N, &N)> {
        self.0.windows(2).map(|w| (&w[0], &w[1]))
    }
}

impl<N: NodeKey> TryFrom<Vec<N>> for Path<N> {
    type Error = PathError;

    fn try_from(nodes: Vec<N>) -> Result<Self, PathError> {
        Path::new(nodes)
    }
}

impl<N> From<Path<N>> for Vec<N> {
    fn from(path: Path<N>) -> Vec<N> {
        path.0
    }
}

/// A probe or its reply travelling along a source-routed path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "N: NodeKey", serialize = "N: NodeKey"))]
pub struct ProbeFrame<N> {
    /// Chosen by the prober; echoed in the reply so it can be matched to its send time.
    pub id: u64,
    /// The probed path, prober first. Replies carry the same path.
    pub path: Path<N>,
    /// Index in `path` of the node this datagram is addressed to.
    pub hop: u8,
}

/// A routing-control datagram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "N: NodeKey", serialize = "N: NodeKey"))]
pub enum Message<N> {
    /// A probe travelling from the path's source towards its destination.
    Probe(ProbeFrame<N>),
    /// The reply, travelling from the destination back to the source.
    Pong(ProbeFrame<N>),
    /// Link-state dissemination.
    Gossip(GossipMessage<N>),
}

/// Why a datagram could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a valid postcard encoding of a [`Message`] (includes invalid paths).
    #[error("malformed routing frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The hop index points outside the path or at its source.
    #[error("probe hop {hop} is out of range for a path of {len} nodes")]
    BadHop {
        /// The hop index received.
        hop: u8,
        /// The number of nodes in the path received.
        len: usize,
    },
}

impl<N: NodeKey> Message<N> {
    /// Encodes the message for the wire.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail; an empty frame would be rejected
        // by the peer, which is the safest fallback if it ever did.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes and validates a datagram received from the network.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let message: Message<N> = postcard::from_bytes(bytes)?;
        if let Message::Probe(frame) | Message::Pong(frame) = &message {
            let len = frame.path.nodes().len();
            if frame.hop as usize >= len {
                return Err(DecodeError::BadHop {
                    hop: frame.hop,
                    len,
                });
            }
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(nodes: &[u16]) -> Path<PeerIndex> {
        Path::new(nodes.iter().map(|&n| PeerIndex(n)).collect()).expect("valid path")
    }

    #[test]
    fn path_validation() {
        assert_eq!(
            Path::new(vec![PeerIndex(1)]).expect_err("invalid path"),
            PathError::Length(1)
        );
        assert_eq!(
            Path::new((0..5).map(PeerIndex).collect()).expect_err("invalid path"),
            PathError::Length(5)
        );
        assert_eq!(
            Path::new(vec![PeerIndex(1), PeerIndex(2), PeerIndex(1)]).expect_err("invalid path"),
            PathError::Loop
        );
        let path = p(&[1, 2, 3]);
        assert_eq!(path.relays(), &[PeerIndex(2)]);
        assert_eq!(path.first_hop(), &PeerIndex(2));
        assert_eq!(path.destination(), &PeerIndex(3));
        assert_eq!(path.links().count(), 2);
    }

    #[test]
    fn probe_roundtrip_is_compact() {
        let msg = Message::Probe(ProbeFrame {
            id: 7,
            path: p(&[1, 2, 3]),
            hop: 1,
        });
        let bytes = msg.encode();
        assert!(bytes.len() <= 8, "{} bytes", bytes.len());
        assert_eq!(Message::<PeerIndex>::decode(&bytes).expect("decodes"), msg);
    }

    #[test]
    fn rejects_loops_and_bad_hops() {
        // Probe, id 1, path of 3 nodes [1, 2, 1], hop 1: a loop.
        assert!(Message::<PeerIndex>::decode(&[0, 1, 3, 1, 2, 1, 1]).is_err());
        // Path [1, 2], hop 5.
        assert!(matches!(
            Message::<PeerIndex>::decode(&[0, 1, 2, 1, 2, 5]),
            Err(DecodeError::BadHop { hop: 5, len: 2 })
        ));
        assert!(Message::<PeerIndex>::decode(&[]).is_err());
        assert!(Message::<PeerIndex>::decode(&[9, 9, 9]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::<PeerIndex>::decode(&bytes);
        }

        #[test]
        fn probe_frames_roundtrip(id in any::<u64>(), a in 0u16..50, b in 50u16..100, hop in 0u8..2) {
            let msg = Message::Pong(ProbeFrame { id, path: p(&[a, b]), hop });
            prop_assert_eq!(Message::<PeerIndex>::decode(&msg.encode()).expect("decodes"), msg);
        }
    }
}
