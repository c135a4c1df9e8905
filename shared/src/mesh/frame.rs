//! Mesh frames: what travels in each UDP datagram between nodes (sans-IO).
//!
//! Every datagram starts with a one-byte kind and the sender's [`ShortId`]. QUIC packets on
//! the direct path ride in [`Frame::Quic`], WireGuard datagrams in [`Frame::Wireguard`]:
//! each protocol authenticates its packets itself. Everything a
//! node must trust *before* QUIC can — routing probes and gossip, membership, and QUIC
//! packets relayed through other nodes — rides in [`Frame::Auth`], which names both ends of
//! the hop, carries a counter against replays, and ends in a MAC under the pair's link key
//! (see [`super::auth`]). Anything else is malformed, counted and dropped by the socket;
//! nothing here panics on input.
//!
//! ```text
//! QUIC:   [0x51][src: 8][quic packet …]
//! WG:     [0x53][src: 8][wireguard datagram …]
//! AUTH:   [0x52][src: 8][dst: 8][counter: u64 BE][body type: 1][body …][tag: 16]
//!   body type 0x01 ROUTING     router datagram (probes, replies, link-state gossip)
//!   body type 0x02 RELAY       [hop: 1][n: 1][path: n × 8][quic packet …]
//!   body type 0x03 SWIM        membership datagram
//!   body type 0x04 BULLETIN    mesh bulletin datagram
//!   body type 0x05 RELAY_WG    [hop: 1][n: 1][path: n × 8][wireguard datagram …]
//!   body type 0x06 TO_ENDPOINT   [endpoint][wireguard datagram …]
//!   body type 0x07 FROM_ENDPOINT [endpoint][wireguard datagram …]
//!   endpoint: [4][ipv4: 4][port: 2 BE] or [6][ipv6: 16][port: 2 BE]
//! ```
//!
//! TO_ENDPOINT and FROM_ENDPOINT carry a tunnel to a *stock* WireGuard endpoint (one that
//! is not a member) through another edge: the member asks the relay to send the datagram to
//! the endpoint from a UDP socket of its own, and the relay brings back what the endpoint
//! answers there. One hop each way; the relay sends only to endpoints its own config names.
//!
//! A relay forwards RELAY and RELAY_WG bodies alike without opening the packet inside; only
//! the last node hands it to its protocol.
//!
//! In a RELAY body, `path` lists every node from the QUIC sender to the QUIC receiver
//! (3 or 4 nodes: at most two relays) and `hop` is the index of the node this hop is
//! addressed to, so relays forward it with no routing state of their own.

use std::net::{IpAddr, SocketAddr};

use crate::identity::ShortId;

use super::auth::TAG_LEN;

/// Kind byte of a direct QUIC frame.
pub const KIND_QUIC: u8 = 0x51;
/// Kind byte of an authenticated frame.
pub const KIND_AUTH: u8 = 0x52;
/// Kind byte of a direct WireGuard frame.
pub const KIND_WIREGUARD: u8 = 0x53;

/// Bytes a QUIC frame adds in front of the QUIC packet.
pub const QUIC_OVERHEAD: usize = 1 + 8;
/// Length of an authenticated frame's header, up to and including the body type.
pub const AUTH_HEADER_LEN: usize = 1 + 8 + 8 + 8 + 1;
/// Most nodes a relayed path may name.
pub const MAX_RELAY_PATH: usize = 4;
/// Bytes a RELAY frame adds around the QUIC packet on a path of `path_len` nodes: the
/// authenticated header, hop and length bytes, the path, and the tag.
pub const fn relay_overhead(path_len: usize) -> usize {
    AUTH_HEADER_LEN + 2 + path_len * 8 + TAG_LEN
}
/// The most any frame adds around a QUIC packet (a RELAY frame on the longest path); QUIC's
/// packet size must leave this much room below the path MTU.
pub const MAX_OVERHEAD: usize = relay_overhead(MAX_RELAY_PATH);

/// What an authenticated frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BodyType {
    /// A routing datagram for the [`crate::routing::Router`].
    Routing,
    /// A QUIC packet on a relayed path.
    Relay,
    /// A membership (SWIM) datagram.
    Swim,
    /// A mesh bulletin datagram ([`super::bulletin`]): mesh-wide switches and purges.
    Bulletin,
    /// A WireGuard datagram on a relayed path.
    RelayWireguard,
    /// A WireGuard datagram for a stock endpoint, to send from the relay.
    ToEndpoint,
    /// A WireGuard datagram a stock endpoint sent to the relay.
    FromEndpoint,
}

impl BodyType {
    fn byte(self) -> u8 {
        match self {
            BodyType::Routing => 0x01,
            BodyType::Relay => 0x02,
            BodyType::Swim => 0x03,
            BodyType::Bulletin => 0x04,
            BodyType::RelayWireguard => 0x05,
            BodyType::ToEndpoint => 0x06,
            BodyType::FromEndpoint => 0x07,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(BodyType::Routing),
            0x02 => Some(BodyType::Relay),
            0x03 => Some(BodyType::Swim),
            0x04 => Some(BodyType::Bulletin),
            0x05 => Some(BodyType::RelayWireguard),
            0x06 => Some(BodyType::ToEndpoint),
            0x07 => Some(BodyType::FromEndpoint),
            _ => None,
        }
    }
}

/// A parsed frame, borrowing the datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A QUIC packet from `src` on the direct path.
    Quic {
        /// The sending node.
        src: ShortId,
        /// The QUIC packet itself.
        payload: &'a [u8],
    },
    /// A WireGuard datagram from `src` on the direct path.
    Wireguard {
        /// The sending node (a claim: WireGuard authenticates the datagram).
        src: ShortId,
        /// The WireGuard datagram itself.
        payload: &'a [u8],
    },
    /// An authenticated frame; not yet verified.
    Auth(AuthFrame<'a>),
}

/// An authenticated frame as parsed, before its tag is checked.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthFrame<'a> {
    /// The node that sent this hop.
    pub src: ShortId,
    /// The node this hop is addressed to.
    pub dst: ShortId,
    /// The sender's frame counter, for replay protection.
    pub counter: u64,
    /// What the body is.
    pub body_type: BodyType,
    /// The body.
    pub body: &'a [u8],
    /// Everything the tag covers (header and body).
    pub signed: &'a [u8],
    /// The MAC.
    pub tag: &'a [u8],
}

/// A RELAY body, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct RelayBody<'a> {
    /// Index in `path` of the node this hop is addressed to.
    pub hop: usize,
    path: [ShortId; MAX_RELAY_PATH],
    len: usize,
    /// The relayed QUIC packet.
    pub payload: &'a [u8],
}

impl RelayBody<'_> {
    /// Every node of the path, QUIC sender first.
    pub fn path(&self) -> &[ShortId] {
        &self.path[..self.len]
    }
}

/// Why a datagram is not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A zero-length datagram.
    #[error("empty datagram")]
    Empty,
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The body type of an authenticated frame is not one we know.
    #[error("unknown body type {0:#04x}")]
    UnknownBody(u8),
    /// The datagram ends before the frame's fixed header does.
    #[error("truncated frame of kind {kind:#04x} ({len} bytes)")]
    Truncated {
        /// The kind byte.
        kind: u8,
        /// The datagram's length.
        len: usize,
    },
    /// A relay body whose path is too short or too long, or whose hop is outside it.
    #[error("relay header names a bad path")]
    BadRelayPath,
    /// An endpoint body whose address family is neither 4 nor 6, or whose datagram is
    /// empty.
    #[error("endpoint body names a bad address")]
    BadEndpoint,
}

impl FrameError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::Empty => "empty",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::UnknownBody(_) => "unknown_body",
            FrameError::Truncated { .. } => "truncated",
            FrameError::BadRelayPath => "bad_relay_path",
            FrameError::BadEndpoint => "bad_endpoint",
        }
    }
}

fn short_at(buf: &[u8], at: usize) -> ShortId {
    let mut s = [0u8; 8];
    s.copy_from_slice(&buf[at..at + 8]);
    ShortId(s)
}

/// Parses a datagram.
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    let &kind = buf.first().ok_or(FrameError::Empty)?;
    let truncated = FrameError::Truncated {
        kind,
        len: buf.len(),
    };
    match kind {
        KIND_QUIC => {
            if buf.len() <= QUIC_OVERHEAD {
                return Err(truncated);
            }
            Ok(Frame::Quic {
                src: short_at(buf, 1),
                payload: &buf[QUIC_OVERHEAD..],
            })
        }
        KIND_WIREGUARD => {
            if buf.len() <= QUIC_OVERHEAD {
                return Err(truncated);
            }
            Ok(Frame::Wireguard {
                src: short_at(buf, 1),
                payload: &buf[QUIC_OVERHEAD..],
            })
        }
        KIND_AUTH => {
            if buf.len() < AUTH_HEADER_LEN + TAG_LEN {
                return Err(truncated);
            }
            let body_byte = buf[AUTH_HEADER_LEN - 1];
            let body_type =
                BodyType::from_byte(body_byte).ok_or(FrameError::UnknownBody(body_byte))?;
            let mut counter = [0u8; 8];
            counter.copy_from_slice(&buf[17..25]);
            let split = buf.len() - TAG_LEN;
            Ok(Frame::Auth(AuthFrame {
                src: short_at(buf, 1),
                dst: short_at(buf, 9),
                counter: u64::from_be_bytes(counter),
                body_type,
                body: &buf[AUTH_HEADER_LEN..split],
                signed: &buf[..split],
                tag: &buf[split..],
            }))
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Parses the body of a RELAY frame.
pub fn decode_relay(body: &[u8]) -> Result<RelayBody<'_>, FrameError> {
    let truncated = FrameError::Truncated {
        kind: KIND_AUTH,
        len: body.len(),
    };
    let (&hop, rest) = body.split_first().ok_or(truncated.clone())?;
    let (&n, rest) = rest.split_first().ok_or(truncated.clone())?;
    let (hop, n) = (usize::from(hop), usize::from(n));
    if !(3..=MAX_RELAY_PATH).contains(&n) || hop == 0 || hop >= n {
        return Err(FrameError::BadRelayPath);
    }
    if rest.len() <= n * 8 {
        return Err(truncated);
    }
    let mut path = [ShortId([0; 8]); MAX_RELAY_PATH];
    for (i, slot) in path.iter_mut().take(n).enumerate() {
        *slot = short_at(rest, i * 8);
    }
    Ok(RelayBody {
        hop,
        path,
        len: n,
        payload: &rest[n * 8..],
    })
}

/// Appends a TO_ENDPOINT or FROM_ENDPOINT body's header (the endpoint's address); the
/// caller appends the WireGuard datagram.
pub fn encode_endpoint_header(out: &mut Vec<u8>, endpoint: SocketAddr) {
    match endpoint.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&endpoint.port().to_be_bytes());
}

/// Parses a TO_ENDPOINT or FROM_ENDPOINT body: the endpoint and the datagram.
pub fn decode_endpoint(body: &[u8]) -> Result<(SocketAddr, &[u8]), FrameError> {
    let truncated = FrameError::Truncated {
        kind: KIND_AUTH,
        len: body.len(),
    };
    let (&family, rest) = body.split_first().ok_or(truncated.clone())?;
    let (ip, rest): (IpAddr, &[u8]) = match family {
        4 => {
            let (ip, rest) = rest.split_at_checked(4).ok_or(truncated.clone())?;
            let octets: [u8; 4] = ip.try_into().map_err(|_| truncated.clone())?;
            (IpAddr::from(octets), rest)
        }
        6 => {
            let (ip, rest) = rest.split_at_checked(16).ok_or(truncated.clone())?;
            let octets: [u8; 16] = ip.try_into().map_err(|_| truncated.clone())?;
            (IpAddr::from(octets), rest)
        }
        _ => return Err(FrameError::BadEndpoint),
    };
    let (port, datagram) = rest.split_at_checked(2).ok_or(truncated)?;
    if datagram.is_empty() {
        return Err(FrameError::BadEndpoint);
    }
    let port = u16::from_be_bytes([port[0], port[1]]);
    Ok((SocketAddr::new(ip, port), datagram))
}

/// Writes the QUIC frame header for `src` into `out` (cleared first), ready for the packet.
pub fn encode_quic_header(out: &mut Vec<u8>, src: ShortId) {
    out.clear();
    append_quic_header(out, src);
}

/// Appends a QUIC frame header to `out`, for building several frames back to back (one
/// segmentation-offload send).
pub fn append_quic_header(out: &mut Vec<u8>, src: ShortId) {
    out.push(KIND_QUIC);
    out.extend_from_slice(&src.0);
}

/// Appends a direct WireGuard frame header to `out`; the caller appends the datagram.
pub fn append_wireguard_header(out: &mut Vec<u8>, src: ShortId) {
    out.push(KIND_WIREGUARD);
    out.extend_from_slice(&src.0);
}

/// Writes an authenticated frame's header into `out` (cleared first). The caller appends
/// the body, then the tag over everything written.
pub fn encode_auth_header(
    out: &mut Vec<u8>,
    src: ShortId,
    dst: ShortId,
    counter: u64,
    body_type: BodyType,
) {
    out.clear();
    append_auth_header(out, src, dst, counter, body_type);
}

/// Appends an authenticated frame's header to `out`, for building several frames back to
/// back; the tag then covers everything from this header on.
pub fn append_auth_header(
    out: &mut Vec<u8>,
    src: ShortId,
    dst: ShortId,
    counter: u64,
    body_type: BodyType,
) {
    out.push(KIND_AUTH);
    out.extend_from_slice(&src.0);
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&counter.to_be_bytes());
    out.push(body_type.byte());
}

/// Appends a RELAY body's header (hop and path); the caller appends the QUIC packet.
/// `path` must hold 3 or 4 nodes and `hop` index one of them after the first.
pub fn encode_relay_header(out: &mut Vec<u8>, hop: usize, path: &[ShortId]) {
    debug_assert!((3..=MAX_RELAY_PATH).contains(&path.len()) && hop > 0 && hop < path.len());
    out.push(hop as u8);
    out.push(path.len() as u8);
    for id in path {
        out.extend_from_slice(&id.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wireguard_frame_round_trips() {
        let src = ShortId([3; 8]);
        let mut buf = Vec::new();
        append_wireguard_header(&mut buf, src);
        buf.extend_from_slice(b"\x01wg");
        assert_eq!(
            decode(&buf),
            Ok(Frame::Wireguard {
                src,
                payload: b"\x01wg"
            })
        );
        assert!(matches!(
            decode(&buf[..9]),
            Err(FrameError::Truncated {
                kind: KIND_WIREGUARD,
                ..
            })
        ));
    }

    #[test]
    fn quic_frame_round_trips() {
        let mut buf = Vec::new();
        encode_quic_header(&mut buf, ShortId([7; 8]));
        buf.extend_from_slice(b"packet");
        assert_eq!(
            decode(&buf),
            Ok(Frame::Quic {
                src: ShortId([7; 8]),
                payload: b"packet"
            })
        );
    }

    #[test]
    fn relay_frame_round_trips() {
        let path = [ShortId([1; 8]), ShortId([2; 8]), ShortId([3; 8])];
        let mut buf = Vec::new();
        encode_auth_header(&mut buf, path[0], path[1], 99, BodyType::Relay);
        encode_relay_header(&mut buf, 1, &path);
        buf.extend_from_slice(b"quic");
        buf.extend_from_slice(&[0xaa; TAG_LEN]);
        let Ok(Frame::Auth(auth)) = decode(&buf) else {
            panic!("not an auth frame");
        };
        assert_eq!((auth.src, auth.dst, auth.counter), (path[0], path[1], 99));
        assert_eq!(auth.body_type, BodyType::Relay);
        assert_eq!(auth.tag, &[0xaa; TAG_LEN]);
        assert_eq!(auth.signed.len(), buf.len() - TAG_LEN);
        let relay = decode_relay(auth.body).expect("relay body");
        assert_eq!(relay.hop, 1);
        assert_eq!(relay.path(), &path);
        assert_eq!(relay.payload, b"quic");
    }

    #[test]
    fn relay_overhead_matches_the_encoding() {
        let path = [ShortId([1; 8]); MAX_RELAY_PATH];
        let mut buf = Vec::new();
        encode_auth_header(&mut buf, path[0], path[1], 1, BodyType::Relay);
        encode_relay_header(&mut buf, 1, &path);
        assert_eq!(buf.len() + TAG_LEN, MAX_OVERHEAD);
        assert_eq!(MAX_OVERHEAD, 76);
    }

    #[test]
    fn malformed_datagrams_are_errors() {
        assert_eq!(decode(&[]), Err(FrameError::Empty));
        assert_eq!(decode(&[0xff, 1, 2]), Err(FrameError::UnknownKind(0xff)));
        assert!(matches!(
            decode(&[KIND_QUIC, 1, 2]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[KIND_AUTH; 30]),
            Err(FrameError::Truncated { .. })
        ));
        let mut unknown_body = vec![KIND_AUTH; AUTH_HEADER_LEN + TAG_LEN];
        unknown_body[AUTH_HEADER_LEN - 1] = 0x7f;
        assert_eq!(decode(&unknown_body), Err(FrameError::UnknownBody(0x7f)));
        // Paths of 2 or 5 nodes, hop 0, hop past the end.
        for (hop, n) in [(1u8, 2u8), (1, 5), (0, 3), (3, 3)] {
            let mut body = vec![hop, n];
            body.extend_from_slice(&[0u8; 41]);
            assert_eq!(decode_relay(&body), Err(FrameError::BadRelayPath));
        }
        assert!(matches!(
            decode_relay(&[1, 3, 0, 0]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn endpoint_bodies_round_trip_both_families() {
        for endpoint in ["192.0.2.7:51820", "[2001:db8::7]:443"] {
            let endpoint: SocketAddr = endpoint.parse().expect("addr");
            let mut body = Vec::new();
            encode_endpoint_header(&mut body, endpoint);
            body.extend_from_slice(b"\x04wg");
            assert_eq!(decode_endpoint(&body), Ok((endpoint, &b"\x04wg"[..])));
            assert!(decode_endpoint(&body[..body.len() - 3]).is_err());
        }
        assert_eq!(decode_endpoint(&[5, 1, 2]), Err(FrameError::BadEndpoint));
        assert_eq!(
            decode_endpoint(&[4, 192, 0, 2, 7, 0, 1]),
            Err(FrameError::BadEndpoint)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Frame::Auth(auth)) = decode(&data) {
                let _ = decode_relay(auth.body);
                let _ = decode_endpoint(auth.body);
            }
            let _ = decode_relay(&data);
            let _ = decode_endpoint(&data);
        }
    }
}
