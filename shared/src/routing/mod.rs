//! Route selection, path statistics and link-state gossip (sans-IO).
//!
//! This module decides *which path* a node's traffic to a destination (an origin connector)
//! takes: directly, or relayed through up to two other mesh nodes. It owns
//!
//! - [`stats`]: per-path probe statistics (smoothed RTT after RFC 6298, RTT variance, a
//!   "recent" RTT, loss over a window of probes, liveness after consecutive misses);
//! - [`probe`]: the probe scheduler (active path every 250 ms, standby paths every second,
//!   everything else every five seconds by default);
//! - [`linkstate`] and [`gossip`]: each node's measurements of its direct links, versioned
//!   per origin and spread epidemically as deltas, so every node learns the whole mesh;
//! - [`select`]: pure route computation over the link-state graph (≤ 2 relays) and the cost
//!   formula;
//! - [`route`]: the per-destination hysteresis state machine (clear win, sustain, dwell,
//!   jitter, immediate failover);
//! - [`router`]: [`Router`], the state machine a node runs, tying the above together;
//! - [`wire`]: the postcard-encoded probe and gossip datagrams.
//!
//! Nothing here opens a socket or reads a clock: every entry point takes `now` as a
//! [`Timestamp`], and outputs are polled (`poll_transmit`, `poll_timeout`, `poll_event`), the
//! way `quinn-proto` works. The real node and the virtual-time simulator in
//! `skylane-simulations` run the same code.
//!
//! It does not carry user data, relay data datagrams, encrypt, or track membership: the mesh
//! socket relays data along the path [`Router::route`] returns, and membership (SWIM) tells
//! the router about peers through [`Router::add_peer`] / [`Router::remove_peer`].

pub mod config;
pub mod gossip;
pub mod linkstate;
pub mod probe;
pub mod route;
pub mod router;
pub mod select;
pub mod stats;
pub mod time;
pub mod view;
pub mod wire;

pub use config::{ConfigError, RoutingConfig};
pub use linkstate::{LinkMetrics, LinkStateDb, LinkUpdate};
pub use route::{ChosenRoute, RouteEvent, SwitchReason};
pub use router::{HandleError, Router, RouterCounters, Transmit, TransmitKind};
pub use select::{PathCost, cost_ms};
pub use stats::{PathState, PathStats};
pub use time::Timestamp;
pub use view::MeshView;
pub use wire::{DecodeError, Message, NodeKey, Path, PathError, PeerIndex};
