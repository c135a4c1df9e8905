//! Virtual-time network for the routing core.
//!
//! - [`matrix`]: RTT matrices (CSV in the format of `simulations/data/rtt_matrix.csv`, or
//!   synthesized), and the true optimal ≤ 2-relay paths they imply;
//! - [`net`]: the event-driven network — seeded RNG, event queue, per-link latency (one
//!   way = RTT / 2), jitter, loss, cut links, crashed nodes — with one real
//!   [`Router`](skylane_shared::routing::Router) per node;
//! - [`wire`]: the mesh socket's sans-IO core under every node, so datagrams are framed,
//!   authenticated and relayed as on the real wire ([`VirtualNet::with_wire`]);
//! - [`experiments`]: the measurements reported in `docs/routing.md` (route quality,
//!   convergence, gossip bandwidth, failover, flapping), shared by the CLI and the tests.

pub mod experiments;
pub mod matrix;
pub mod net;
pub mod wire;

pub use matrix::{MatrixError, RttMatrix};
pub use net::{NetConfig, VirtualNet};
