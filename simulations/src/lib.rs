//! Skylane's region simulator.
//!
//! [`vnet`] is a deterministic virtual-time network: every node runs the real routing core
//! from `skylane_shared::routing`, its datagrams cross virtual links with the latency of a
//! measured RTT matrix, and the clock jumps from event to event, so an hour of mesh life
//! runs in seconds and a seed replays a run exactly.
//!
//! [`wan`] is the other half: a user-space WAN emulator (UDP and TCP delay relays on real
//! sockets) that gives real processes on loopback the latency, jitter and loss of a region
//! pair, for the real-process harness. The demo origin lives beside them.

pub mod procs;
pub mod realnet;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod virtual_run;
pub mod vnet;
pub mod wan;
