//! A user-space WAN emulator: UDP and TCP relays that add the latency, jitter and loss of a
//! region pair to traffic between real processes on loopback.
//!
//! This machine's kernel has no `netem`, so the real-process simulator puts a relay between
//! every pair of processes that talk: a process sends to the relay's `listen` address and
//! the relay forwards to the `target` after the emulated one-way delay, and the replies back
//! the same way.
//!
//! - [`UdpLink`]: one datagram relay. Every datagram is delayed independently by
//!   `rtt / 2 ± jitter` (so jitter may reorder datagrams, as on a real network, unless
//!   [`UdpOptions::keep_order`] is set) and dropped with probability `loss`, per direction.
//!   Each client source address gets its own outbound socket (an *association*), so the
//!   target sees one peer per client and replies find their way back; idle associations
//!   expire.
//! - [`TcpLink`]: one stream relay. Each chunk read is delivered `rtt / 2 ± jitter` later
//!   but never before the chunk read before it, so the byte stream stays in order; "loss"
//!   holds a chunk (and everything behind it) back by one retransmission timeout; the
//!   handshake costs one RTT; FIN propagates after the one-way delay.
//! - [`LinkHandle`]: changes a running link (slower, lossier, cut, restored).
//! - [`Wan`]: starts many links and stops them together.
//!
//! What it does not emulate: bandwidth limits and queueing (the relay forwards as fast as
//! loopback allows, up to a bound on bytes in flight), TCP congestion control and slow
//! start, MTU, and packet-level TCP behaviour (it relays a byte stream between two
//! loopback connections, not segments). The measured accuracy is in `docs/wan-emulator.md`.

mod profile;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use profile::{LinkHandle, LinkProfile, LinkState, LinkStats, MAX_RTT, MIN_RTO, ProfileError};
pub use tcp::{TcpLink, TcpOptions};
pub use udp::{UdpLink, UdpOptions};

/// Why a link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The profile is invalid.
    #[error("invalid link profile: {0}")]
    Profile(#[from] ProfileError),
    /// The options are inconsistent.
    #[error("invalid link options: {0}")]
    Options(String),
    /// The listening socket could not be bound.
    #[error("cannot bind {transport} {addr}: {source}")]
    Bind {
        /// `tcp` or `udp`.
        transport: Transport,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which protocol a link relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Datagrams.
    Udp,
    /// Byte streams.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        })
    }
}

/// A running link. Dropping it does not stop it; call [`shutdown`](Self::shutdown) (or
/// cancel the token it was started with).
#[derive(Debug)]
pub struct Link {
    transport: Transport,
    local_addr: SocketAddr,
    target: SocketAddr,
    handle: LinkHandle,
    /// Stops every task of this link.
    cancel: CancellationToken,
    /// The link's tasks (the relay loop, association readers, connections).
    tasks: TaskTracker,
}

impl Link {
    /// The protocol relayed.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The address clients send to (the bound listen address, with the real port if 0 was
    /// asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address traffic is relayed to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The handle that changes this link at runtime.
    pub fn handle(&self) -> &LinkHandle {
        &self.handle
    }

    /// Stops the link: closes the listening socket, every association and connection, and
    /// waits for its tasks to end. Bytes and datagrams still in flight are dropped.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Many links, started from one seed and stopped together.
///
/// The simulator starts one link per directed pair of processes that talk (for example, a
/// UDP link per ordered pair of mesh nodes, a TCP link per emulated client → edge), names
/// each one, and schedules faults through their [`LinkHandle`]s.
#[derive(Debug)]
pub struct Wan {
    seed: u64,
    cancel: CancellationToken,
    links: Vec<(String, Link)>,
}

impl Wan {
    /// An empty WAN. Link `i` gets a seed derived from `seed` and `i`, so a run replays the
    /// same jitter and loss draws for the same traffic.
    pub fn new(seed: u64) -> Self {
        Wan {
            seed,
            cancel: CancellationToken::new(),
            links: Vec::new(),
        }
    }

    fn next_seed(&self) -> u64 {
        splitmix64(self.seed ^ splitmix64(self.links.len() as u64))
    }

    /// Starts a UDP link named `name` from `listen` to `target`.
    pub async fn add_udp(
        &mut self,
        name: impl Into<String>,
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
        options: UdpOptions,
    ) -> Result<&Link, LinkError> {
        let seed = self.next_seed();
        let link = UdpLink::start_with(
            listen,
            target,
            profile,
            seed,
            options,
            self.cancel.child_token(),
        )
        .await?;
        self.links.push((name.into(), link));
        Ok(&self.links[self.links.len() - 1].1)
    }

    /// Starts a TCP link named `name` from `listen` to `target`.
    pub async fn add_tcp(
        &mut self,
        name: impl Into<String>,
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
        options: TcpOptions,
    ) -> Result<&Link, LinkError> {
        let seed = self.next_seed();
        let link = TcpLink::start_with(
            listen,
            target,
            profile,
            seed,
            options,
            self.cancel.child_token(),
        )
        .await?;
        self.links.push((name.into(), link));
        Ok(&self.links[self.links.len() - 1].1)
    }

    /// The first link with this name.
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|(n, _)| n == name).map(|(_, l)| l)
    }

    /// Every link with its name, in the order they were added.
    pub fn links(&self) -> impl Iterator<Item = (&str, &Link)> {
        self.links.iter().map(|(n, l)| (n.as_str(), l))
    }

    /// Stops every link and waits for all their tasks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for (_, link) in self.links {
            link.shutdown().await;
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How much earlier than its deadline a delivery timer is armed.
///
/// tokio's timer wheel has 1 ms ticks and rounds a deadline up to the next tick, and the
/// epoll timeout rounds up again, so a timer fires on average about 1 ms late. Arming it
/// early by this much centres the error on zero (a delivery may then be up to about a
/// millisecond early or late), instead of making every hop late. See
/// `docs/wan-emulator.md` for the measured effect.
const TIMER_EARLY: Duration = Duration::from_micros(1000);

/// Sleeps until `deadline`, corrected for the timer's lateness.
async fn sleep_until_delivery(deadline: Instant) {
    let armed = deadline.checked_sub(TIMER_EARLY).unwrap_or(deadline);
    if armed > Instant::now() {
        tokio::time::sleep_until(armed).await;
    }
}

/// Whether an entry due at `deadline` may be delivered now (see [`TIMER_EARLY`]).
fn is_due(deadline: Instant, now: Instant) -> bool {
    deadline <= now + TIMER_EARLY
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::{exclusive, median, udp_echo};
    use super::*;

    #[test]
    fn seeds_differ_per_link() {
        let a = splitmix64(1 ^ splitmix64(0));
        let b = splitmix64(1 ^ splitmix64(1));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn wan_starts_names_and_stops_links() -> anyhow::Result<()> {
        let _serial = exclusive().await;
        let (echo, echo_task) = udp_echo().await?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let mut wan = Wan::new(3);
        let profile = LinkProfile::new(Duration::from_millis(20));
        wan.add_udp("a>b", any, echo, profile, UdpOptions::default())
            .await?;
        wan.add_tcp("a>b", any, echo, profile, TcpOptions::default())
            .await?;
        wan.add_udp("b>a", any, echo, profile, UdpOptions::default())
            .await?;
        assert_eq!(wan.links().count(), 3);
        let link = wan.link("b>a").ok_or_else(|| anyhow::anyhow!("missing"))?;
        let client = tokio::net::UdpSocket::bind(any).await?;
        let mut rtts = Vec::new();
        let mut buf = [0u8; 16];
        for _ in 0..5 {
            let t = std::time::Instant::now();
            client.send_to(b"x", link.local_addr()).await?;
            tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await??;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let m = median(&mut rtts);
        assert!((18.0..=23.0).contains(&m), "median {m} ms");
        tokio::time::timeout(Duration::from_secs(5), wan.shutdown()).await?;
        echo_task.abort();
        Ok(())
    }
}
