//! The mesh socket and its frames.

pub mod frame;
pub mod socket;

pub use socket::{MeshSocket, ProbeReply, short_id_of, virtual_addr};
