//! The mesh socket, its frames, the link keys that authenticate them, and the control loop
//! that runs routing over it.
//!
//! The socket is layered: [`addr`] names peers for quinn, [`peers`] holds where each is and
//! which path it takes, [`core`] judges and frames every datagram with no I/O (the
//! simulator drives it in virtual time), [`batch`] packs many datagrams per system call,
//! and [`socket`] is the thin adapter that quinn and the WireGuard driver use.

pub mod addr;
pub mod auth;
mod batch;
pub mod bulletin;
pub mod control;
pub mod core;
pub mod frame;
pub mod handoff;
pub mod peers;
mod poller;
pub mod report;
pub mod socket;
pub mod status_table;

pub use addr::{short_id_of, virtual_addr};
pub use core::{Inbound, MeshCore};
pub use frame::BodyType;
pub use socket::{BindError, ControlDatagram, EndpointDatagram, MeshSocket};
