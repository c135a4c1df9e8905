//! Which way a tunnel to a stock WireGuard endpoint goes: straight from this edge, or
//! through another edge that relays its datagrams (sans-IO).
//!
//! A stock endpoint is not a mesh member, so routing cannot probe it. The tunnel itself
//! tells: WireGuard authenticates every datagram, and TCP inside answers every segment that
//! carries data, SYN or FIN within about a round trip. So a path is *broken* when something
//! that expects an answer went out on it and nothing authenticated came back for
//! [`answer_timeout`] (at least 1 s). Then the tunnel moves to the next candidate, in
//! config order: the direct path (unless the config forbids it), then each relay. The
//! endpoint follows by WireGuard's roaming, as it would after a NAT rebinding.
//!
//! While on a relay, the direct path is tried again every [`DIRECT_RETRY`]: a handshake
//! initiation goes out directly, and if the endpoint answers it directly the tunnel moves
//! back. Keepalives and bare ACKs expect no answer and never judge a path.

use std::net::IpAddr;
use std::time::Duration;

use crate::identity::ShortId;

/// While a relay carries the tunnel, the direct path is tried again this often.
pub const DIRECT_RETRY: Duration = Duration::from_secs(30);
/// The least time a path gets to answer.
const MIN_ANSWER: Duration = Duration::from_secs(1);
/// The most time a path gets to answer, however slow its last handshake was.
const MAX_ANSWER: Duration = Duration::from_secs(3);

/// How long a path gets to answer something that expects an answer: 1 s plus three round
/// trips of the last handshake, at most 3 s.
pub fn answer_timeout(rtt: Option<Duration>) -> Duration {
    (MIN_ANSWER + rtt.unwrap_or_default() * 3).min(MAX_ANSWER)
}

/// A way to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// From this edge's own UDP socket.
    Direct,
    /// Through this member, which sends from a UDP socket of its own.
    Relay(ShortId),
}

/// What [`PathChoice::poll`] asks of the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Nothing to do.
    Stay,
    /// The current path stopped answering; datagrams go this way from now on.
    Switched {
        /// The path that stopped answering.
        from: Via,
        /// The new path.
        to: Via,
    },
    /// Send a handshake initiation directly, to see whether the direct path works again.
    ProbeDirect,
}

/// The path state of one tunnel; time is a [`Duration`] since any fixed instant.
#[derive(Clone, Debug)]
pub struct PathChoice {
    candidates: Vec<Via>,
    current: usize,
    /// When the current path was chosen.
    since: Duration,
    /// The first datagram that expects an answer and has none yet, on the current path.
    waiting_since: Option<Duration>,
    /// When the direct path was last tried while a relay carries the tunnel.
    direct_tried: Duration,
}

impl PathChoice {
    /// The direct path (if `direct`), then `relays` in order; `None` with no candidate.
    pub fn new(direct: bool, relays: &[ShortId], now: Duration) -> Option<Self> {
        let candidates: Vec<Via> = direct
            .then_some(Via::Direct)
            .into_iter()
            .chain(relays.iter().map(|r| Via::Relay(*r)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(Self {
            candidates,
            current: 0,
            since: now,
            waiting_since: None,
            direct_tried: now,
        })
    }

    /// The path datagrams take now.
    pub fn current(&self) -> Via {
        self.candidates[self.current]
    }

    /// Whether there is more than one way: with one, nothing is ever judged.
    pub fn has_alternatives(&self) -> bool {
        self.candidates.len() > 1
    }

    /// A datagram went out on the current path; `expects_answer` if the endpoint answers it
    /// within a round trip (a handshake initiation, a TCP segment with data, SYN or FIN).
    pub fn sent(&mut self, now: Duration, expects_answer: bool) {
        if expects_answer && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// An authenticated datagram came back by `via`. Returns the switch it caused, if any:
    /// an answer on the direct path while a relay carries the tunnel moves it back.
    pub fn heard(&mut self, now: Duration, via: Via) -> Option<(Via, Via)> {
        let current = self.current();
        if via == current {
            self.waiting_since = None;
            return None;
        }
        if via == Via::Direct
            && let Some(direct) = self.candidates.iter().position(|c| *c == Via::Direct)
        {
            self.current = direct;
            self.since = now;
            self.waiting_since = None;
            return Some((current, Via::Direct));
        }
        None
    }

    /// What to do now; call it every timer tick. `rtt`: the last handshake's round trip.
    pub fn poll(&mut self, now: Duration, rtt: Option<Duration>) -> PathAction {
        if !self.has_alternatives() {
            return PathAction::Stay;
        }
        let timeout = answer_timeout(rtt);
        if let Some(waiting) = self.waiting_since
            && now.saturating_sub(waiting) >= timeout
            && now.saturating_sub(self.since) >= timeout
        {
            let from = self.current();
            self.current = (self.current + 1) % self.candidates.len();
            self.since = now;
            self.waiting_since = None;
            if from == Via::Direct {
                // It just failed: the next try is a full retry interval away.
                self.direct_tried = now;
            }
            return PathAction::Switched {
                from,
                to: self.current(),
            };
        }
        let direct_possible = self.candidates.contains(&Via::Direct);
        if direct_possible
            && self.current() != Via::Direct
            && now.saturating_sub(self.direct_tried) >= DIRECT_RETRY
        {
            self.direct_tried = now;
            return PathAction::ProbeDirect;
        }
        PathAction::Stay
    }
}

/// Whether the endpoint answers this IP packet within a round trip: a TCP segment that
/// carries data, SYN or FIN (and is not a reset). Bare ACKs, resets and anything that is not
/// TCP expect nothing.
pub fn expects_answer(packet: &[u8]) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let (total, tcp) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if packet.len() < 20 || packet[9] != 6 {
                return false;
            }
            (usize::from(u16::from_be_bytes([packet[2], packet[3]])), ihl)
        }
        6 => {
            if packet.len() < 40 || packet[6] != 6 {
                return false;
            }
            (
                40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])),
                40,
            )
        }
        _ => return false,
    };
    let Some(header) = packet.get(tcp..tcp + 20) else {
        return false;
    };
    let offset = usize::from(header[12] >> 4) * 4;
    let flags = header[13];
    let (fin, syn, rst) = (flags & 0x01 != 0, flags & 0x02 != 0, flags & 0x04 != 0);
    let payload = total.min(packet.len()).saturating_sub(tcp + offset);
    !rst && (syn || fin || payload > 0)
}

/// The IP version of an address, for binding a socket of the same family.
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn relay(n: u8) -> Via {
        Via::Relay(ShortId([n; 8]))
    }

    #[test]
    fn one_way_only_is_never_judged() {
        let mut p = PathChoice::new(true, &[], S(0)).expect("a candidate");
        p.sent(S(1), true);
        assert_eq!(p.poll(S(100), None), PathAction::Stay);
        assert_eq!(p.current(), Via::Direct);
        assert!(PathChoice::new(false, &[], S(0)).is_none());
    }

    #[test]
    fn silence_after_a_segment_moves_to_the_next_way_and_on_round() {
        let r1 = ShortId([1; 8]);
        let r2 = ShortId([2; 8]);
        let mut p = PathChoice::new(true, &[r1, r2], S(0)).expect("candidates");
        // Keepalives and bare ACKs judge nothing.
        p.sent(S(10), false);
        assert_eq!(p.poll(S(20), None), PathAction::Stay);
        // Answered in time: stays.
        p.sent(S(20), true);
        assert_eq!(p.heard(MS(20_050), Via::Direct), None);
        assert_eq!(p.poll(S(25), None), PathAction::Stay);
        // Unanswered for the timeout (1 s + 3 × 100 ms): the next way.
        p.sent(S(30), true);
        assert_eq!(p.poll(MS(31_200), Some(MS(100))), PathAction::Stay);
        assert_eq!(
            p.poll(MS(31_300), Some(MS(100))),
            PathAction::Switched {
                from: Via::Direct,
                to: relay(1)
            }
        );
        // The new way gets its own time, then the one after it, then round again.
        p.sent(MS(31_300), true);
        assert_eq!(p.poll(MS(32_000), None), PathAction::Stay);
        assert!(matches!(
            p.poll(MS(32_300), None),
            PathAction::Switched { to, .. } if to == relay(2)
        ));
        p.sent(MS(32_300), true);
        assert!(matches!(
            p.poll(MS(33_300), None),
            PathAction::Switched {
                to: Via::Direct,
                ..
            }
        ));
    }

    #[test]
    fn on_a_relay_the_direct_path_is_tried_again_and_taken_when_it_answers() {
        let r1 = ShortId([1; 8]);
        let mut p = PathChoice::new(true, &[r1], S(0)).expect("candidates");
        p.sent(S(1), true);
        assert!(matches!(p.poll(S(3), None), PathAction::Switched { .. }));
        assert_eq!(p.current(), relay(1));
        // Nothing changes until the retry is due, a full interval after the switch.
        assert_eq!(p.poll(S(10), None), PathAction::Stay);
        assert_eq!(p.poll(S(32), None), PathAction::Stay);
        assert_eq!(p.poll(S(33), None), PathAction::ProbeDirect);
        assert_eq!(p.poll(S(34), None), PathAction::Stay);
        assert_eq!(p.heard(S(34), Via::Direct), Some((relay(1), Via::Direct)));
        assert_eq!(p.current(), Via::Direct);
        // With the direct path forbidden, it is never tried.
        let mut p = PathChoice::new(false, &[r1], S(0)).expect("candidates");
        assert_eq!(p.current(), relay(1));
        assert_eq!(p.poll(S(100), None), PathAction::Stay);
        assert_eq!(p.heard(S(100), Via::Direct), None);
    }

    /// An IPv4 TCP packet with these flags and payload length.
    fn tcp4(flags: u8, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = 6;
        p[20 + 12] = 5 << 4;
        p[20 + 13] = flags;
        p
    }

    #[test]
    fn only_segments_that_get_an_answer_expect_one() {
        const ACK: u8 = 0x10;
        assert!(!expects_answer(&tcp4(ACK, 0)));
        assert!(expects_answer(&tcp4(ACK, 100)));
        assert!(expects_answer(&tcp4(0x02, 0)), "SYN");
        assert!(expects_answer(&tcp4(ACK | 0x01, 0)), "FIN");
        assert!(!expects_answer(&tcp4(0x04, 0)), "RST");
        let mut udp = tcp4(ACK, 100);
        udp[9] = 17;
        assert!(!expects_answer(&udp));
        assert!(!expects_answer(&[]));
        assert!(!expects_answer(&[0x45; 10]));
        // IPv6.
        let mut v6 = vec![0u8; 40 + 20 + 7];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&27u16.to_be_bytes());
        v6[6] = 6;
        v6[40 + 12] = 5 << 4;
        v6[40 + 13] = ACK;
        assert!(expects_answer(&v6));
    }
}
