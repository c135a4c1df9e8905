//! Virtual addresses: how quinn names a mesh peer.
//!
//! quinn addresses every peer by a socket address. The mesh gives each member one that
//! names the node, not a place: a unique-local IPv6 address whose last 8 bytes are the
//! member's [`ShortId`]. The mesh socket maps it to the path the member's datagrams take
//! right now, so the path can change under a QUIC connection without quinn noticing.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::identity::{NodeId, ShortId};

/// First 8 bytes of every virtual address: a unique-local IPv6 prefix that spells "Skylane".
const VIRTUAL_PREFIX: [u8; 8] = [0xfd, 0x53, 0x6b, 0x79, 0x6c, 0x61, 0x6e, 0x65];
/// Port of every virtual address; the address bytes alone name the node.
const VIRTUAL_PORT: u16 = 1;

/// The address quinn uses for a peer.
pub fn virtual_addr(id: &NodeId) -> SocketAddr {
    virtual_addr_of(&id.short())
}

/// The address quinn uses for the peer whose short id is `short`.
pub fn virtual_addr_of(short: &ShortId) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&VIRTUAL_PREFIX);
    octets[8..].copy_from_slice(&short.0);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), VIRTUAL_PORT)
}

/// The node a virtual address stands for, if it is one.
pub fn short_id_of(addr: &SocketAddr) -> Option<ShortId> {
    let IpAddr::V6(v6) = addr.ip() else {
        return None;
    };
    let o = v6.octets();
    if o[..8] != VIRTUAL_PREFIX {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&o[8..]);
    Some(ShortId(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    #[test]
    fn virtual_addresses_round_trip() {
        let id = NodeKey::generate().expect("key").id();
        let addr = virtual_addr(&id);
        assert_eq!(short_id_of(&addr), Some(id.short()));
        assert_eq!(short_id_of(&"127.0.0.1:1".parse().expect("addr")), None);
        assert_eq!(short_id_of(&"[fd00::1]:1".parse().expect("addr")), None);
    }
}
