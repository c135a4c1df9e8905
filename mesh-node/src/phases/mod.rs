//! The edge's request phases, in the order every request walks them (pingora's model):
//!
//! | phase | module | what it decides |
//! |---|---|---|
//! | accept | [`accept`] | connection caps per edge, IP and prefix; new connections per second per IP |
//! | TLS | `crate::server` | the handshake, within `tls_handshake_ms` |
//! | connection | [`connection`] | head and keep-alive timeouts of each connection |
//! | client address | [`client_addr`] | who the client is (trusted proxies, PROXY protocol) |
//! | request filter | [`request_filter`] | body size, [`rate_limit`] zones, the [`challenge`] when [`under_attack`], a place in the tunnel ([`flows`]) |
//! | cache | [`cache`] | hit, stale, coalesced wait, fetch into the cache, or bypass (`crate::cache` keeps the objects) |
//! | upstream | [`upstream`] | one tunnel stream; the response; the [`websocket`] pipe |
//! | response filter / log | `crate::proxy` | request id, metrics, the automatic trigger's counts |
//!
//! Each module's decision is a function of the request, the policy and the time, tested
//! without sockets; `crate::proxy` and `crate::server` wire them together. A websocket
//! upgrade passes the same filters before it becomes a byte pipe.

pub mod accept;
pub mod cache;
pub mod challenge;
pub mod client_addr;
pub mod connection;
pub mod flows;
pub mod rate_limit;
pub mod request_filter;
pub mod under_attack;
pub mod upstream;
pub mod websocket;

use std::net::IpAddr;
use std::time::Instant;

use client_addr::Peer;

/// What every phase knows about one request.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    /// `X-Request-Id`: the client's (when it is short and printable) or a fresh one.
    pub id: String,
    /// When the request head arrived.
    pub started: Instant,
    /// Where the connection comes from.
    pub peer: Peer,
    /// The client, as [`client_addr`] decided.
    pub client: IpAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// The host, lowercased, without port (empty when the request named none).
    pub host: String,
}
