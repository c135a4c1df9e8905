//! The deterministic byte pattern served by `GET /bytes/N`.
//!
//! Byte `i` of every response is `(i * 31 + 7) % 251`. The pattern repeats every
//! 251 bytes (a prime, so it never lines up with power-of-two chunk or buffer
//! sizes and a shifted or dropped chunk changes the checksum). The body is cut
//! from one shared table with `Bytes::slice`, so a 1 GB response costs no
//! allocation per chunk and never holds more than the table in memory.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Length of the pattern's period.
const PERIOD: u64 = 251;

/// Size of each body chunk. 64 KiB keeps syscalls few without making any one
/// write large enough to starve other connections on the same runtime.
const CHUNK_BYTES: usize = 64 * 1024;

/// The byte at offset `i` of the pattern.
pub fn pattern_byte(i: u64) -> u8 {
    // Reduce first so the multiplication cannot overflow for any u64 offset.
    let r = ((i % PERIOD) * 31 + 7) % PERIOD;
    // r < 251, so the conversion is lossless.
    r as u8
}

/// One chunk plus a full period, so a chunk may start at any phase of the pattern.
fn table() -> Bytes {
    static TABLE: OnceLock<Bytes> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let len = CHUNK_BYTES as u64 + PERIOD;
            Bytes::from((0..len).map(pattern_byte).collect::<Vec<u8>>())
        })
        .clone()
}

/// A response body yielding `len` pattern bytes in chunks of at most 64 KiB.
///
/// Its size hint is exact, so hyper sends `Content-Length` on its own.
pub struct PatternBody {
    /// Offset of the next byte to send, which fixes the phase of the next chunk.
    offset: u64,
    /// Bytes still to send.
    remaining: u64,
    /// Shared pattern table that chunks are sliced from.
    table: Bytes,
}

impl PatternBody {
    /// A body of exactly `len` bytes starting at pattern offset 0.
    pub fn new(len: u64) -> Self {
        Self {
            offset: 0,
            remaining: len,
            table: table(),
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(CHUNK_BYTES as u64) as usize;
        let start = (self.offset % PERIOD) as usize;
        let chunk = self.table.slice(start..start + len);
        self.offset += len as u64;
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn first_bytes_match_formula() {
        let expected: Vec<u8> = (0u64..600).map(|i| ((i * 31 + 7) % 251) as u8).collect();
        let got: Vec<u8> = (0u64..600).map(pattern_byte).collect();
        assert_eq!(got, expected);
        assert_eq!(pattern_byte(0), 7);
        assert_eq!(pattern_byte(1), 38);
        assert_eq!(pattern_byte(251), 7);
    }

    #[test]
    fn huge_offsets_do_not_overflow() {
        assert_eq!(pattern_byte(u64::MAX), pattern_byte(u64::MAX % 251));
    }

    #[tokio::test]
    async fn body_spanning_many_chunks_is_the_pattern() {
        // Not a multiple of the chunk size or the period, so every phase is exercised.
        let len = 3 * CHUNK_BYTES as u64 + 1234;
        let body = PatternBody::new(len);
        assert_eq!(body.size_hint().exact(), Some(len));
        let collected = body.collect().await.map(|c| c.to_bytes());
        let Ok(bytes) = collected;
        assert_eq!(bytes.len() as u64, len);
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(*b, pattern_byte(i as u64), "byte {i}");
        }
    }

    #[tokio::test]
    async fn empty_body_ends_immediately() {
        let body = PatternBody::new(0);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
