//! The peer table: where each member is, and which path datagrams to it take.
//!
//! A member's *address* is where its datagrams go on the direct path: set from config or
//! DNS ([`PeerTable::set_addr`]), or, for a member with none (an edge behind NAT, a
//! connector that dials out), learned from the source of its authenticated frames. A
//! configured address is never moved by a learned one.
//!
//! A *route* says a destination is reached through relays ([`PeerTable::set_route`]); a
//! destination with no route is reached directly. Routing decides; the table only holds
//! the decision so every datagram can read it.
//!
//! Sending and receiving read the table for every datagram from several threads, so it
//! is read-mostly: a write lock only when an address or a route changes, and the time a
//! member was last heard from is an atomic updated under the read lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::frame::MAX_RELAY_PATH;
use crate::identity::ShortId;
use crate::routing::Timestamp;

/// Where a member's datagrams go on the direct path.
#[derive(Debug)]
struct PeerPath {
    addr: SocketAddr,
    /// Set from config or DNS; a learned source address never overrides it.
    configured: bool,
    /// When an authenticated frame last came from the member, µs since the table's
    /// epoch plus one (0: never).
    heard_us: AtomicU64,
    /// Where its last authenticated frame came from, when that is not `addr`: a member
    /// whose datagrams reach this node from another address than the one this node sends
    /// to (NAT, a multi-homed host, a port-mapping hop) still proves it sends from there.
    source: Option<SocketAddr>,
}

/// A relayed route: every node from this one to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayRoute {
    nodes: [ShortId; MAX_RELAY_PATH],
    len: usize,
}

impl RelayRoute {
    /// A route along `path` (this node first, destination last), if it has one or two
    /// relays.
    pub fn new(path: &[ShortId]) -> Option<Self> {
        if !(3..=MAX_RELAY_PATH).contains(&path.len()) {
            return None;
        }
        let mut nodes = [ShortId([0; 8]); MAX_RELAY_PATH];
        nodes[..path.len()].copy_from_slice(path);
        Some(Self {
            nodes,
            len: path.len(),
        })
    }

    /// Every node of the route, this one first.
    pub fn nodes(&self) -> &[ShortId] {
        &self.nodes[..self.len]
    }
}

/// What the table knows of one member, for status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// Where its datagrams go on the direct path.
    pub addr: SocketAddr,
    /// Whether the address came from config or DNS (else it was learned).
    pub configured: bool,
    /// When an authenticated frame last came from it.
    pub heard: Option<Timestamp>,
}

/// Addresses and routes of every member; see the module docs.
#[derive(Debug, Default)]
pub struct PeerTable {
    paths: RwLock<HashMap<ShortId, PeerPath>>,
    /// Destinations routed through relays; absent means direct.
    routes: RwLock<HashMap<ShortId, RelayRoute>>,
}

fn micros(t: Timestamp) -> u64 {
    u64::try_from(t.since_epoch().as_micros())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

impl PeerTable {
    /// Sets where a member's datagrams go (from config or a DNS answer).
    pub fn set_addr(&self, peer: ShortId, addr: SocketAddr) {
        if let Ok(mut paths) = self.paths.write() {
            let heard = paths
                .get(&peer)
                .map_or(0, |p| p.heard_us.load(Ordering::Relaxed));
            let source = paths.get(&peer).and_then(|p| p.source);
            paths.insert(
                peer,
                PeerPath {
                    addr,
                    configured: true,
                    heard_us: AtomicU64::new(heard),
                    source: source.filter(|s| *s != addr),
                },
            );
        }
    }

    /// Whether datagrams that name `peer` as their sender but carry no authentication of
    /// their own (WireGuard frames: the tunnel authenticates what is inside) are taken
    /// from `from`: the member's address, or where its last authenticated frame came from.
    pub fn sends_from(&self, peer: &ShortId, from: SocketAddr) -> bool {
        self.paths.read().is_ok_and(|paths| {
            paths
                .get(peer)
                .is_some_and(|p| p.addr == from || p.source == Some(from))
        })
    }

    /// Where a member's datagrams go on the direct path, if anywhere.
    pub fn addr(&self, peer: &ShortId) -> Option<SocketAddr> {
        self.paths
            .read()
            .ok()
            .and_then(|p| p.get(peer).map(|p| p.addr))
    }

    /// What the table knows of a member.
    pub fn view(&self, peer: &ShortId) -> Option<PeerView> {
        let paths = self.paths.read().ok()?;
        let p = paths.get(peer)?;
        let heard = p.heard_us.load(Ordering::Relaxed);
        Some(PeerView {
            addr: p.addr,
            configured: p.configured,
            heard: (heard > 0).then(|| Timestamp::from_micros(heard - 1)),
        })
    }

    /// An authenticated frame came from `peer` at `from`: note when, and learn or move its
    /// address unless one was configured. Only authenticated frames may teach an address:
    /// any other claim of a source can be forged, and learning from it would let a stranger
    /// pin a member's address or turn this node's answers towards anyone.
    pub fn heard_from(&self, peer: ShortId, from: SocketAddr, now: Timestamp) {
        let stamp = micros(now);
        // (learn the address, note another source)
        let (learn, note) = match self.paths.read() {
            Ok(paths) => match paths.get(&peer) {
                Some(p) => {
                    p.heard_us.store(stamp, Ordering::Relaxed);
                    let elsewhere = p.addr != from;
                    (
                        !p.configured && elsewhere,
                        p.configured && elsewhere && p.source != Some(from),
                    )
                }
                None => (true, false),
            },
            Err(_) => (false, false),
        };
        if !(learn || note) {
            return;
        }
        let Ok(mut paths) = self.paths.write() else {
            return;
        };
        match paths.get_mut(&peer) {
            // Checked again under the write lock: a configured address may have arrived.
            Some(p) if p.configured => {
                p.source = (p.addr != from).then_some(from);
            }
            _ => {
                paths.insert(
                    peer,
                    PeerPath {
                        addr: from,
                        configured: false,
                        heard_us: AtomicU64::new(stamp),
                        source: None,
                    },
                );
            }
        }
    }

    /// Sets the path datagrams to `destination` take: `path` lists every node from this one
    /// to the destination; two nodes (or `None`) mean direct. Takes effect with the next
    /// datagram.
    pub fn set_route(&self, destination: ShortId, path: Option<&[ShortId]>) {
        let Ok(mut routes) = self.routes.write() else {
            return;
        };
        match path.and_then(RelayRoute::new) {
            Some(route) => {
                routes.insert(destination, route);
            }
            None => {
                routes.remove(&destination);
            }
        }
    }

    /// The relayed route to `destination`, if it is not reached directly.
    pub fn route(&self, destination: &ShortId) -> Option<RelayRoute> {
        self.routes
            .read()
            .ok()
            .and_then(|r| r.get(destination).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn a_configured_address_is_never_moved_by_a_learned_one() {
        let table = PeerTable::default();
        let peer = ShortId([1; 8]);
        table.set_addr(peer, addr("192.0.2.1:7000"));
        table.heard_from(peer, addr("198.51.100.9:4000"), Timestamp::from_millis(5));
        let view = table.view(&peer).expect("known");
        assert_eq!(view.addr, addr("192.0.2.1:7000"));
        assert!(view.configured);
        assert_eq!(view.heard, Some(Timestamp::from_millis(5)));
    }

    #[test]
    fn a_member_sends_from_its_address_or_where_it_proved_itself() {
        let table = PeerTable::default();
        let peer = ShortId([3; 8]);
        let (own, nat, stranger) = (
            addr("192.0.2.1:7000"),
            addr("198.51.100.9:4000"),
            addr("203.0.113.5:5000"),
        );
        table.set_addr(peer, own);
        assert!(table.sends_from(&peer, own));
        assert!(!table.sends_from(&peer, nat));
        // Its authenticated frames come from behind a NAT: that address may send too, and
        // the one this node sends to stays.
        table.heard_from(peer, nat, Timestamp::from_millis(1));
        assert!(table.sends_from(&peer, nat));
        assert!(table.sends_from(&peer, own));
        assert!(!table.sends_from(&peer, stranger));
        assert_eq!(table.addr(&peer), Some(own));
        assert!(!table.sends_from(&ShortId([4; 8]), own), "not a member");
    }

    #[test]
    fn a_member_without_an_address_is_learned_and_follows_its_source() {
        let table = PeerTable::default();
        let peer = ShortId([2; 8]);
        assert_eq!(table.addr(&peer), None);
        table.heard_from(peer, addr("198.51.100.9:4000"), Timestamp::ZERO);
        assert_eq!(table.addr(&peer), Some(addr("198.51.100.9:4000")));
        assert_eq!(
            table.view(&peer).map(|v| v.heard),
            Some(Some(Timestamp::ZERO))
        );
        // NAT rebinding: the next frame comes from another port.
        table.heard_from(peer, addr("198.51.100.9:4001"), Timestamp::from_millis(9));
        let view = table.view(&peer).expect("known");
        assert_eq!(view.addr, addr("198.51.100.9:4001"));
        assert!(!view.configured);
        // Config wins from then on.
        table.set_addr(peer, addr("192.0.2.7:7000"));
        table.heard_from(peer, addr("198.51.100.9:4002"), Timestamp::from_millis(10));
        assert_eq!(table.addr(&peer), Some(addr("192.0.2.7:7000")));
    }

    #[test]
    fn routes_of_two_nodes_or_none_mean_direct() {
        let table = PeerTable::default();
        let (me, relay, dst) = (ShortId([1; 8]), ShortId([2; 8]), ShortId([3; 8]));
        table.set_route(dst, Some(&[me, relay, dst]));
        assert_eq!(
            table.route(&dst).map(|r| r.nodes().to_vec()),
            Some(vec![me, relay, dst])
        );
        table.set_route(dst, Some(&[me, dst]));
        assert_eq!(table.route(&dst), None);
        table.set_route(dst, Some(&[me, relay, dst]));
        table.set_route(dst, None);
        assert_eq!(table.route(&dst), None);
        assert!(RelayRoute::new(&[me; 5]).is_none());
    }
}
