//! The Skylane edge node: terminates users' TLS, HTTP/1.1, HTTP/2, websockets and raw TCP
//! near them and carries each flow as one QUIC stream over a persistent tunnel to an
//! origin connector.
//!
//! It does not talk to origin servers itself (the connector does), and it never forwards
//! a flow anywhere but a mesh member.

pub mod acme;
pub mod body;
pub mod cache;
pub mod config;
pub mod errors;
pub mod handover;
pub mod phases;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod request_metrics;
pub mod routes;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod tunnel;
