//! Websocket keep-alive at the edge: pings a quiet client, closes one that stopped
//! answering.
//!
//! After the upgrade the edge only copies bytes, so it follows the origin → client
//! direction's framing (RFC 6455 §5.2, headers only) to know where a frame ends: a control
//! frame may go between any two frames, even inside a fragmented message (§5.4), but never
//! inside a frame. When the client has sent nothing for the ping interval, the edge puts
//! a ping there; the client's pong (or anything else it sends) shows it is alive. The pong
//! travels on to the origin, which ignores it: an unsolicited pong is allowed (§5.5.3).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use skylane_shared::pipe::SpliceHooks;
use tokio::time::{Instant, Sleep};

/// An empty ping frame from a server: FIN + opcode 0x9, unmasked, no payload.
const PING: &[u8] = &[0x89, 0x00];

/// What a client hears when the tunnel under its websocket fails (the connector behind it
/// died, or the edge lost every path to it): close code 1012, "service restart" (IANA's
/// WebSocket close code registry), which tells a client to reconnect, and a new websocket
/// goes through a connector that works. Without it the client would see the connection
/// drop with no close frame (1006, "abnormal closure").
const CLOSE_TUNNEL_LOST: &[u8] = &close_frame::<{ 4 + TUNNEL_LOST.len() }>(1012, TUNNEL_LOST);
const TUNNEL_LOST: &[u8] = b"the tunnel to the origin was lost";

/// A close frame from a server (unmasked): FIN + opcode 0x8, the payload length, the code,
/// the reason. `N` is 4 + the reason's length, at most 125 + 2 (RFC 6455 §5.5).
const fn close_frame<const N: usize>(code: u16, reason: &[u8]) -> [u8; N] {
    assert!(
        N == 4 + reason.len() && N <= 127,
        "a control frame's payload is at most 125 bytes"
    );
    let mut frame = [0u8; N];
    frame[0] = 0x88;
    frame[1] = (N - 2) as u8;
    let code = code.to_be_bytes();
    frame[2] = code[0];
    frame[3] = code[1];
    let mut i = 0;
    while i < reason.len() {
        frame[4 + i] = reason[i];
        i += 1;
    }
    frame
}

/// How soon to look again when a ping is due but a frame is still being copied.
const RETRY_AT_BOUNDARY: Duration = Duration::from_millis(50);

/// Where the next frame starts in a stream of websocket frames. Sans-IO: feed it the
/// bytes in order.
#[derive(Clone, Debug, Default)]
pub struct FrameTracker {
    /// Header bytes of the frame being read, when it is split across chunks.
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl FrameTracker {
    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(len) = self.header_complete() {
                self.payload_left = len;
                self.have = 0;
            }
        }
    }

    /// The payload length once the header is whole.
    fn header_complete(&self) -> Option<u64> {
        if self.have < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let (ext, len7) = match self.header[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if self.have < need {
            return None;
        }
        let len = len7.unwrap_or_else(|| {
            self.header[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        });
        Some(len)
    }

    /// Whether the bytes fed so far end exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.payload_left == 0 && self.have == 0
    }
}

/// [`SpliceHooks`] for an upgraded websocket at the edge (or, without pings, any other
/// upgraded flow: then it only ends a flow whose client went quiet).
#[derive(Debug)]
pub struct Keepalive {
    /// `None`: never ping (not a websocket).
    ping_every: Option<Duration>,
    idle_limit: Duration,
    framing: FrameTracker,
    last_heard: Instant,
    /// A ping was sent since the client was last heard.
    pinged: bool,
    sleep: Pin<Box<Sleep>>,
    /// Pings sent, for metrics.
    pings: u32,
}

impl Keepalive {
    /// Pings after `ping_every` of client silence; ends the pipe after `idle_limit`.
    pub fn new(ping_every: Duration, idle_limit: Duration) -> Self {
        Self::with(Some(ping_every), idle_limit)
    }

    /// Never pings (the flow is not a websocket); ends the pipe after `idle_limit` of
    /// client silence.
    pub fn idle_only(idle_limit: Duration) -> Self {
        Self::with(None, idle_limit)
    }

    fn with(ping_every: Option<Duration>, idle_limit: Duration) -> Self {
        Self {
            ping_every,
            idle_limit,
            framing: FrameTracker::default(),
            last_heard: Instant::now(),
            pinged: false,
            sleep: Box::pin(tokio::time::sleep(ping_every.unwrap_or(idle_limit))),
            pings: 0,
        }
    }

    /// Pings sent so far.
    pub fn pings(&self) -> u32 {
        self.pings
    }
}

impl SpliceHooks for Keepalive {
    fn sent_down(&mut self, bytes: &[u8]) {
        self.framing.feed(bytes);
    }

    fn tunnel_failed(&mut self) -> Option<Bytes> {
        // A close frame may go between any two frames, never inside one.
        (self.ping_every.is_some() && self.framing.at_boundary())
            .then(|| Bytes::from_static(CLOSE_TUNNEL_LOST))
    }

    fn received_up(&mut self, _n: usize) {
        // The timer is not moved here (that would cost a timer update per read); when it
        // fires, it looks at `last_heard` and sleeps again if the client spoke meanwhile.
        self.last_heard = Instant::now();
        self.pinged = false;
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let quiet = now.saturating_duration_since(self.last_heard);
            if quiet >= self.idle_limit {
                metrics::counter!("skylane_edge_websocket_idle_closed_total").increment(1);
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the websocket client stopped answering pings",
                ))));
            }
            let Some(ping_every) = self.ping_every else {
                self.sleep.as_mut().reset(self.last_heard + self.idle_limit);
                continue;
            };
            if quiet < ping_every {
                self.sleep.as_mut().reset(self.last_heard + ping_every);
                continue;
            }
            if self.pinged {
                self.sleep.as_mut().reset(self.last_heard + self.idle_limit);
                continue;
            }
            if !self.framing.at_boundary() {
                self.sleep.as_mut().reset(now + RETRY_AT_BOUNDARY);
                continue;
            }
            self.pinged = true;
            self.pings += 1;
            metrics::counter!("skylane_edge_websocket_pings_total").increment(1);
            // Look again a ping interval on (the client may have answered, and be due its
            // next ping), or at the idle limit if that comes first.
            let next = (self.last_heard + self.idle_limit).min(now + ping_every);
            self.sleep.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Bytes::from_static(PING))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x81];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(mask_bit | payload_len as u8),
            126..=65535 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x55, payload_len));
        f
    }

    #[test]
    fn boundaries_are_found_whatever_the_chunking() {
        let mut stream = Vec::new();
        for (len, masked) in [
            (5, false),
            (300, false),
            (70_000, false),
            (0, true),
            (126, true),
        ] {
            stream.extend(frame(len, masked));
        }
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut t = FrameTracker::default();
            for (i, piece) in stream.chunks(chunk).enumerate() {
                t.feed(piece);
                if (i + 1) * chunk < stream.len() && chunk == 1 {
                    // Mid-stream, a boundary only right after a frame's last byte.
                    let fed = (i + 1) * chunk;
                    let ends = [7, 7 + 304, 7 + 304 + 70_010, 7 + 304 + 70_010 + 6];
                    assert_eq!(t.at_boundary(), ends.contains(&fed), "after {fed} bytes");
                }
            }
            assert!(t.at_boundary(), "chunk size {chunk}");
        }
        let mut t = FrameTracker::default();
        t.feed(&frame(300, false)[..3]);
        assert!(!t.at_boundary());
    }

    // Real time with short intervals (no paused clock: see the note in
    // `phases::connection`'s tests). Lower bounds are exact; upper bounds leave room for a
    // loaded machine.
    const SLACK: Duration = Duration::from_secs(3);

    #[tokio::test]
    async fn a_quiet_client_is_pinged_then_closed() {
        let (every, idle) = (Duration::from_millis(300), Duration::from_millis(750));
        let mut k = Keepalive::new(every, idle);
        let event = std::future::poll_fn(|cx| k.poll_event(cx)).await;
        assert_eq!(event.expect("ping").expect("ok"), Bytes::from_static(PING));
        // The client answers: no close at `idle` after the start, a new ping `every` later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        k.received_up(6);
        let event = std::future::poll_fn(|cx| k.poll_event(cx)).await;
        assert!(event.expect("ping").is_ok());
        let waited = Instant::now() - started;
        assert!(waited >= every && waited < every + SLACK, "{waited:?}");
        // Now it stays silent: closed `idle` after it was last heard.
        let event = std::future::poll_fn(|cx| k.poll_event(cx)).await;
        assert_eq!(
            event.expect("event").expect_err("closed").kind(),
            io::ErrorKind::TimedOut
        );
        let waited = Instant::now() - started;
        assert!(waited >= idle && waited < idle + SLACK, "{waited:?}");
        assert_eq!(k.pings(), 2);
    }

    #[tokio::test]
    async fn no_ping_goes_inside_a_frame() {
        let (every, idle) = (Duration::from_millis(50), Duration::from_secs(10));
        let mut k = Keepalive::new(every, idle);
        let big = frame(1000, false);
        k.sent_down(&big[..500]);
        let waiting = tokio::spawn(async move {
            let e = std::future::poll_fn(|cx| k.poll_event(cx)).await;
            e.map(|r| r.is_ok())
        });
        // Six ping intervals pass inside the frame: no ping.
        tokio::time::sleep(every * 6).await;
        assert!(
            !waiting.is_finished(),
            "a ping must wait for the frame's end"
        );
        waiting.abort();
        // After the frame's last byte, the ping goes out.
        let mut k = Keepalive::new(every, idle);
        k.sent_down(&big);
        let started = Instant::now();
        let e = std::future::poll_fn(|cx| k.poll_event(cx)).await;
        assert!(e.expect("ping").is_ok());
        assert!(Instant::now() - started < SLACK);
    }

    #[tokio::test]
    async fn a_lost_tunnel_gets_a_close_frame_1012_between_frames_only() {
        let every = Duration::from_secs(30);
        let mut k = Keepalive::new(every, every * 2);
        let close = k.tunnel_failed().expect("a close frame at the start");
        // The frame as a client reads it: close opcode, unmasked, length, code, reason.
        assert_eq!(close[0], 0x88);
        assert_eq!(usize::from(close[1]), close.len() - 2);
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1012);
        assert!(std::str::from_utf8(&close[4..]).is_ok());
        let big = frame(1000, false);
        k.sent_down(&big[..500]);
        assert_eq!(k.tunnel_failed(), None, "not inside a frame");
        k.sent_down(&big[500..]);
        assert!(k.tunnel_failed().is_some(), "after the frame's last byte");
        // An upgraded flow that is not a websocket has no frames to close.
        assert_eq!(Keepalive::idle_only(every).tunnel_failed(), None);
    }
}
