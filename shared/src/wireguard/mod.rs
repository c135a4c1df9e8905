//! WireGuard tunnels in user space: boringtun's Noise IK state machine over a UDP socket,
//! and a smoltcp TCP/IP stack inside, so that one TCP connection per client flow crosses
//! the tunnel with no TUN device and no root.
//!
//! Two uses:
//! - an edge reaches a stock WireGuard endpoint (wg-quick, a firewall, a cloud VPN gateway)
//!   from a standard peer config ([`config::PeerFile`]) over a UDP socket of its own;
//!   behind it, a Skylane connector listening on its WireGuard address, or the origin;
//! - an edge and a connector whose member entry says `transport = "wireguard"` tunnel over
//!   the mesh socket, relayed and failed over like QUIC ([`mesh`]).
//!
//! A tunnel to a stock endpoint may also go through another edge when its own way fails,
//! or when the config says so ([`path`] decides, [`relay`] carries).
//!
//! It does not route IP for other hosts.

pub mod config;
pub mod keys;
pub mod mesh;
pub mod path;
pub mod relay;
pub mod stack;
pub mod tunnel;

pub use config::{Peer, PeerFile};
pub use keys::SecretKey;
pub use tunnel::{ConnectError, TunnelStatus, WgReadHalf, WgStream, WgTunnel, WgWriteHalf};
