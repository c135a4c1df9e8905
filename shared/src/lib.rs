//! Skylane's shared core: node identities, the wire protocol, the mesh socket, routing and
//! gossip state, and config types. Logic here is sans-IO where it can be: it takes `now` as
//! an argument so the real node and the simulator run the same code.
//!
//! It does not terminate TLS for users, speak HTTP to origins, or parse whole node config
//! files; those live in `mesh-node` and `origin-connector`.

pub mod cli;
pub mod config;
pub mod flow;
pub mod handover;
pub mod identity;
pub mod lifecycle;
pub mod membership;
pub mod mesh;
pub mod pipe;
pub mod quic;
pub mod reload;
pub mod resolve;
pub mod routing;
pub mod shards;
/// SWIM membership liveness (foca), sans-IO: which members are alive, suspect or down.
pub mod swim;
pub mod telemetry;
pub mod trust;
pub mod wire;
pub mod wireguard;
