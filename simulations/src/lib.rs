//! Skylane's region simulator.
//!
//! [`vnet`] is a deterministic virtual-time network: every node runs the real routing core
//! from `skylane_shared::routing`, its datagrams cross virtual links with the latency of a
//! measured RTT matrix, and the clock jumps from event to event, so an hour of mesh life
//! runs in seconds and a seed replays a run exactly.
//!
//! It does not run real processes or sockets; the real-process harness and the demo origin
//! live beside it.

pub mod vnet;
