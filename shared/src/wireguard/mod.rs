//! WireGuard tunnels in user space: boringtun's Noise IK state machine over a UDP socket,
//! and a smoltcp TCP/IP stack inside, so that one TCP connection per client flow crosses
//! the tunnel with no TUN device and no root.
//!
//! This is what an edge uses to reach a stock WireGuard endpoint (wg-quick, a firewall, a
//! cloud VPN gateway) from a standard peer config ([`config::PeerFile`]): behind it, a
//! Skylane connector listening on its WireGuard address, or the origin itself. It does not
//! route IP for other hosts, and it does not carry WireGuard over the mesh socket's relays.

pub mod config;
pub mod keys;
pub mod stack;
pub mod tunnel;

pub use config::{Peer, PeerFile};
pub use keys::SecretKey;
pub use tunnel::{ConnectError, TunnelStatus, WgStream, WgTunnel};
