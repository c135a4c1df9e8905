//! Mesh frames: what travels in each UDP datagram between nodes (sans-IO).
//!
//! Every datagram starts with a one-byte kind and the sender's [`ShortId`]. QUIC packets
//! ride in [`Frame::Quic`]; probes measure paths. Anything else is malformed, counted and
//! dropped by the socket; nothing here panics on input.
//!
//! ```text
//! QUIC:  [0x51][src: 8][quic packet …]
//! PING:  [0x50][src: 8][seq: u64 BE][sent_us: u64 BE]
//! PONG:  [0x4f][src: 8][seq: u64 BE][echoed sent_us: u64 BE]
//! ```

use crate::identity::ShortId;

/// Kind byte of a QUIC frame.
pub const KIND_QUIC: u8 = 0x51;
/// Kind byte of a probe request.
pub const KIND_PING: u8 = 0x50;
/// Kind byte of a probe reply.
pub const KIND_PONG: u8 = 0x4f;

/// Bytes a QUIC frame adds in front of the QUIC packet.
pub const QUIC_OVERHEAD: usize = 1 + 8;
const PROBE_LEN: usize = 1 + 8 + 8 + 8;

/// A parsed frame, borrowing the datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A QUIC packet from `src`.
    Quic {
        /// The sending node.
        src: ShortId,
        /// The QUIC packet itself.
        payload: &'a [u8],
    },
    /// A path probe; answer with a [`Frame::Pong`] carrying the same `seq` and `sent_us`.
    Ping {
        /// The probing node.
        src: ShortId,
        /// Probe sequence number, chosen by the prober.
        seq: u64,
        /// The prober's clock when sent, in microseconds; opaque to the answerer.
        sent_us: u64,
    },
    /// The answer to a probe.
    Pong {
        /// The answering node.
        src: ShortId,
        /// The probe's sequence number.
        seq: u64,
        /// The probe's `sent_us`, echoed.
        sent_us: u64,
    },
}

/// Why a datagram is not a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A zero-length datagram.
    #[error("empty datagram")]
    Empty,
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The datagram ends before the frame's fixed header does.
    #[error("truncated frame of kind {kind:#04x} ({len} bytes)")]
    Truncated {
        /// The kind byte.
        kind: u8,
        /// The datagram's length.
        len: usize,
    },
}

impl FrameError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::Empty => "empty",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::Truncated { .. } => "truncated",
        }
    }
}

fn short_at(buf: &[u8], at: usize) -> ShortId {
    let mut s = [0u8; 8];
    s.copy_from_slice(&buf[at..at + 8]);
    ShortId(s)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
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
        KIND_PING | KIND_PONG => {
            if buf.len() != PROBE_LEN {
                return Err(truncated);
            }
            let (src, seq, sent_us) = (short_at(buf, 1), u64_at(buf, 9), u64_at(buf, 17));
            Ok(if kind == KIND_PING {
                Frame::Ping { src, seq, sent_us }
            } else {
                Frame::Pong { src, seq, sent_us }
            })
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Writes the QUIC frame header for `src` into `out` (cleared first), ready for the packet.
pub fn encode_quic_header(out: &mut Vec<u8>, src: ShortId) {
    out.clear();
    out.push(KIND_QUIC);
    out.extend_from_slice(&src.0);
}

/// Encodes a probe or its reply.
pub fn encode_probe(kind: u8, src: ShortId, seq: u64, sent_us: u64) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[0] = kind;
    out[1..9].copy_from_slice(&src.0);
    out[9..17].copy_from_slice(&seq.to_be_bytes());
    out[17..25].copy_from_slice(&sent_us.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn probes_round_trip() {
        let ping = encode_probe(KIND_PING, ShortId([1; 8]), 42, 1_000_000);
        assert_eq!(
            decode(&ping),
            Ok(Frame::Ping {
                src: ShortId([1; 8]),
                seq: 42,
                sent_us: 1_000_000
            })
        );
        let pong = encode_probe(KIND_PONG, ShortId([2; 8]), 42, 9);
        assert!(matches!(decode(&pong), Ok(Frame::Pong { seq: 42, .. })));
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
            decode(&[KIND_PING; 10]),
            Err(FrameError::Truncated { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
    }
}
