//! The origin connector: the tunnel terminus beside the origin.
//!
//! It accepts QUIC tunnels from mesh members only (and, when configured, TCP flows from
//! edges behind a WireGuard endpoint, see [`wireguard`]), reads one header per stream, and
//! forwards the flow over pooled keep-alive connections to the origin servers named in its
//! config, balancing across the healthy ones. It never connects anywhere else: it is not
//! an open proxy. It does not terminate users' TLS or apply edge policy; edges do that.

pub mod config;
pub mod dial;
pub mod forward;
pub mod origin;
pub mod pool;
pub mod reload;
pub mod server;
pub mod stream_metrics;
#[cfg(test)]
mod test_origin;
pub mod wireguard;
