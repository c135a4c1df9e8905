//! The mesh socket, its frames, the link keys that authenticate them, and the control loop
//! that runs routing over it.

pub mod auth;
pub mod bulletin;
pub mod control;
pub mod frame;
pub mod report;
pub mod socket;
pub mod status_table;

pub use frame::BodyType;
pub use socket::{BindError, ControlDatagram, MeshSocket, short_id_of, virtual_addr};
