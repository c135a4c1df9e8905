//! The TCP relay: accept, connect to the target, pipe both directions through a delay.
//!
//! What is emulated, per direction of a connection:
//!
//! - **Latency and jitter.** Each chunk read (up to [`TcpOptions::chunk_bytes`]) is written
//!   out at `deliver_at = max(previous deliver_at, sent + rtt / 2 ± jitter)`: delayed, never
//!   reordered, so the stream arrives intact.
//! - **Loss.** TCP cannot lose bytes; a lost segment costs a retransmission. With
//!   probability `loss` per chunk, the chunk (and everything queued behind it) is held back
//!   one extra RTO, `max(200 ms, 2 × rtt)`, the stall a real sender sees on a timeout.
//!   Fast retransmit (one RTT) and congestion-window collapse are not modelled.
//! - **Handshake.** The client's `connect()` completes at once (the kernel accepts on the
//!   relay's listener), so the relay charges the handshake to the first bytes instead: bytes
//!   from the client count as sent no earlier than one RTT after the accept (when a real
//!   `connect()` would have returned), bytes from the server no earlier than 1.5 RTT after
//!   it (when the real server's `accept()` would have returned, the final ACK having
//!   crossed). So `connect()` + one request/response costs 2 RTT, as over a real link, and
//!   a server greeting reaches the client 2 RTT after `connect()` was called. The relay
//!   connects to the target at once; if that fails, the client's connection is closed one
//!   RTT after the accept (a real client would see "connection refused" then).
//! - **Half-close.** EOF on one side is passed on as a FIN (`shutdown(Write)`) after the
//!   one-way delay; the other direction keeps flowing until it ends too. A write error
//!   (the receiver reset or vanished) closes the whole connection.
//! - **Cut.** Bytes due while the link is cut are held until it is restored, then written
//!   one one-way delay later (as if retransmitted the moment the path came back); the
//!   connection stays open. New connections are still accepted during a cut.
//! - **Back-pressure.** At most [`TcpOptions::max_in_flight_bytes`] per direction are held
//!   in the relay; then it stops reading, the kernel buffers fill, and the sender blocks.
//!   This bounds the emulated bandwidth-delay product: throughput per direction is at most
//!   `max_in_flight_bytes / (rtt / 2)`. There is no other bandwidth limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::profile::Counters;
use super::{
    Link, LinkError, LinkHandle, LinkProfile, Transport, sleep_until_delivery, splitmix64,
};

/// Chunks queued per direction; the byte budget is the real bound, this one only keeps the
/// channel bounded too.
const CHUNKS_IN_FLIGHT: usize = 4096;

/// Knobs of a TCP link.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpOptions {
    /// Most bytes held in the relay per direction of one connection (read, not yet
    /// delivered). Default 4 MiB: about what a Linux socket's autotuned window reaches,
    /// enough for 80 MB/s through a 100 ms link.
    pub max_in_flight_bytes: usize,
    /// Largest read, the unit of jitter and loss. Default 64 KiB.
    pub chunk_bytes: usize,
    /// Most connections at once; further ones are closed at once and counted. Default 4096.
    pub max_connections: usize,
    /// How long the connect to the target may take. Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            max_in_flight_bytes: 4 << 20,
            chunk_bytes: 64 << 10,
            max_connections: 4096,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl TcpOptions {
    fn validate(&self) -> Result<(), LinkError> {
        if self.chunk_bytes == 0 || self.max_connections == 0 {
            return Err(LinkError::Options(
                "chunk_bytes and max_connections must be at least 1".into(),
            ));
        }
        if self.max_in_flight_bytes < self.chunk_bytes
            || self.max_in_flight_bytes > Semaphore::MAX_PERMITS
            || u32::try_from(self.chunk_bytes).is_err()
        {
            return Err(LinkError::Options(format!(
                "max_in_flight_bytes ({}) must be at least chunk_bytes ({}) and fit a semaphore",
                self.max_in_flight_bytes, self.chunk_bytes
            )));
        }
        Ok(())
    }
}

/// The TCP relay. See the [module docs](self).
#[derive(Debug)]
pub struct TcpLink;

impl TcpLink {
    /// Starts a TCP link from `listen` to `target` with default options and its own
    /// cancellation token; stop it with [`Link::shutdown`].
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
        seed: u64,
    ) -> Result<Link, LinkError> {
        Self::start_with(
            listen,
            target,
            profile,
            seed,
            TcpOptions::default(),
            CancellationToken::new(),
        )
        .await
    }

    /// Starts a TCP link that stops when `cancel` is cancelled (or on
    /// [`Link::shutdown`]). `seed` seeds the jitter and loss draws (one stream per
    /// connection and direction).
    pub async fn start_with(
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
        seed: u64,
        options: TcpOptions,
        cancel: CancellationToken,
    ) -> Result<Link, LinkError> {
        options.validate()?;
        let handle = LinkHandle::new(profile)?;
        let bind_err = |source| LinkError::Bind {
            transport: Transport::Tcp,
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let tasks = TaskTracker::new();
        info!(%local_addr, %target, ?profile, "tcp link up");
        tasks.spawn(accept_loop(
            listener,
            target,
            handle.clone(),
            seed,
            options,
            cancel.clone(),
            tasks.clone(),
        ));
        Ok(Link {
            transport: Transport::Tcp,
            local_addr,
            target,
            handle,
            cancel,
            tasks,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    handle: LinkHandle,
    seed: u64,
    options: TcpOptions,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut index: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(%err, "tcp link: accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let accepted_at = Instant::now();
        let counters = handle.counters();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            Counters::add(&counters.dropped_overflow, 1);
            debug!(%peer, "tcp link: connection limit reached, closing");
            continue;
        };
        Counters::add(&counters.connections, 1);
        index += 1;
        let conn = Connection {
            target,
            handle: handle.clone(),
            seed: splitmix64(seed ^ splitmix64(index)),
            options: options.clone(),
            cancel: cancel.child_token(),
            accepted_at,
        };
        tasks.spawn(
            async move {
                conn.run(client).await;
                drop(slot);
            }
            .instrument(debug_span!("tcp link connection", %peer, %target)),
        );
    }
}

struct Connection {
    target: SocketAddr,
    handle: LinkHandle,
    seed: u64,
    options: TcpOptions,
    cancel: CancellationToken,
    accepted_at: Instant,
}

impl Connection {
    async fn run(self, client: TcpStream) {
        let rtt = self.handle.profile().rtt;
        let connected = tokio::select! {
            () = self.cancel.cancelled() => return,
            c = tokio::time::timeout(self.options.connect_timeout, TcpStream::connect(self.target)) => c,
        };
        let server = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => return self.refuse(client, rtt, &err.to_string()).await,
            Err(_) => return self.refuse(client, rtt, "timed out").await,
        };
        // Nagle would hold small writes back for an ACK and add its own delay.
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        debug!("tcp link: connected");
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let up = self.pipe(client_read, server_write, self.accepted_at + rtt, 1);
        let down = self.pipe(
            server_read,
            client_write,
            self.accepted_at + rtt + rtt / 2,
            2,
        );
        tokio::select! {
            () = self.cancel.cancelled() => {}
            _ = futures_util::future::join(up, down) => {}
        }
        debug!("tcp link: closed");
    }

    /// The target refused: close the client's connection when a real client would have
    /// learned it, one RTT after its SYN.
    async fn refuse(self, client: TcpStream, rtt: Duration, why: &str) {
        Counters::add(&self.handle.counters().connect_failures, 1);
        debug!(why, "tcp link: cannot connect to the target");
        tokio::select! {
            () = self.cancel.cancelled() => {}
            () = sleep_until_delivery(self.accepted_at + rtt) => {}
        }
        drop(client);
    }

    /// Carries one direction until EOF (then FIN) or an error (then the whole connection
    /// closes). `floor` is the earliest emulated send time of its bytes.
    async fn pipe(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        floor: Instant,
        direction: u64,
    ) {
        let (tx, mut rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
        let budget = Arc::new(Semaphore::new(self.options.max_in_flight_bytes));
        let mut rng = StdRng::seed_from_u64(splitmix64(self.seed ^ direction));
        let handle = &self.handle;
        let chunk_bytes = self.options.chunk_bytes;
        let reader = async {
            let mut buf = vec![0u8; chunk_bytes];
            let mut last = floor;
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(n) => n,
                    Err(err) => {
                        debug!(%err, direction, "tcp link: read failed, passing on EOF");
                        0
                    }
                };
                // `n <= chunk_bytes`, which validate() checked fits a u32.
                let permit = if n == 0 {
                    None
                } else {
                    match budget.clone().acquire_many_owned(n as u32).await {
                        Ok(p) => Some(p),
                        Err(_) => return,
                    }
                };
                let profile = handle.profile();
                let mut delay = profile.one_way(&mut rng);
                if n > 0 && profile.lose(&mut rng) {
                    Counters::add(&handle.counters().stalls, 1);
                    delay += profile.rto();
                }
                let at = last.max(Instant::now().max(floor) + delay);
                last = at;
                let chunk = Chunk {
                    at,
                    data: Bytes::copy_from_slice(&buf[..n]),
                    _permit: permit,
                };
                if tx.send(chunk).await.is_err() || n == 0 {
                    return;
                }
            }
        };
        let writer = async {
            let mut state = handle.subscribe();
            while let Some(chunk) = rx.recv().await {
                sleep_until_delivery(chunk.at).await;
                if state.borrow_and_update().cut {
                    if state.wait_for(|s| !s.cut).await.is_err() {
                        return;
                    }
                    // Retransmitted the moment the path came back: one one-way delay.
                    sleep_until_delivery(Instant::now() + handle.profile().rtt / 2).await;
                }
                if chunk.data.is_empty() {
                    if let Err(err) = to.shutdown().await {
                        debug!(%err, direction, "tcp link: shutdown failed");
                    }
                    return;
                }
                if let Err(err) = to.write_all(&chunk.data).await {
                    debug!(%err, direction, "tcp link: write failed, closing the connection");
                    self.cancel.cancel();
                    return;
                }
                Counters::add(&handle.counters().packets, 1);
                Counters::add(&handle.counters().bytes, chunk.data.len() as u64);
            }
        };
        futures_util::future::join(reader, writer).await;
    }
}

/// Bytes read from one side, waiting for their delivery time. Empty data is EOF.
struct Chunk {
    at: Instant,
    data: Bytes,
    /// Returns the bytes to the direction's budget once delivered (dropped).
    _permit: Option<OwnedSemaphorePermit>,
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use anyhow::{Result, ensure};
    use sha2::{Digest, Sha256};
    use std::net::Ipv4Addr;

    use super::super::test_support::{exclusive, median, tcp_echo};
    use super::*;

    fn localhost() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    async fn connect(addr: SocketAddr) -> Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// One request/response of `len` bytes on `stream`; returns its duration in ms.
    async fn round_trip(stream: &mut TcpStream, len: usize) -> Result<f64> {
        let msg = vec![7u8; len];
        let mut back = vec![0u8; len];
        let t = StdInstant::now();
        stream.write_all(&msg).await?;
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await??;
        ensure!(back == msg, "echo differs");
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    #[tokio::test]
    async fn adds_100ms_per_round_trip_and_2_rtt_for_the_handshake() -> Result<()> {
        let _serial = exclusive().await;
        let (echo, echo_task) = tcp_echo().await?;
        let link = TcpLink::start(
            localhost(),
            echo,
            LinkProfile::new(Duration::from_millis(100)),
            1,
        )
        .await?;
        let t = StdInstant::now();
        let mut stream = connect(link.local_addr()).await?;
        let connect_ms = t.elapsed().as_secs_f64() * 1e3;
        round_trip(&mut stream, 32).await?;
        let first_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut rtts = Vec::new();
        for _ in 0..100 {
            rtts.push(round_trip(&mut stream, 32).await?);
        }
        let m = median(&mut rtts);
        let (min, max) = (rtts[0], rtts[rtts.len() - 1]);
        let within_5 = rtts.iter().filter(|r| (95.0..=105.0).contains(*r)).count();
        println!(
            "tcp 100 ms link: connect() {connect_ms:.3} ms, connect + first round trip {first_ms:.3} ms; 100 round trips median {m:.3} ms, min {min:.3}, max {max:.3}, {within_5} within 100 ± 5"
        );
        ensure!((98.0..=102.0).contains(&m), "median {m} ms");
        // The brief bounds only the median on TCP; a descheduled test process (2 shared
        // cores) makes single round trips late, so the tail is bounded loosely.
        ensure!(
            within_5 >= 90,
            "only {within_5} of 100 round trips within 100 ± 5 ms"
        );
        // Handshake (1 RTT, charged to the first bytes) + the request/response (1 RTT).
        ensure!(
            (196.0..=206.0).contains(&first_ms),
            "connect + first round trip {first_ms} ms"
        );
        // EOF propagates: our FIN reaches the echo server, which closes, and its FIN
        // comes back.
        stream.shutdown().await?;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await??;
        ensure!(rest.is_empty());
        link.shutdown().await;
        echo_task.abort();
        Ok(())
    }

    /// Streams `len` pseudo-random bytes through `link` to an echo server and back,
    /// checking the sha256 of what comes back. Returns the seconds it took.
    async fn stream_through(link: SocketAddr, len: usize) -> Result<f64> {
        let stream = connect(link).await?;
        let (mut r, mut w) = stream.into_split();
        let mut rng = StdRng::seed_from_u64(9);
        let data: Vec<u8> = (0..len).map(|_| rand::Rng::random(&mut rng)).collect();
        let sent_hash = Sha256::digest(&data);
        let t = StdInstant::now();
        let writer = tokio::spawn(async move {
            for piece in data.chunks(10_000) {
                w.write_all(piece).await?;
            }
            w.shutdown().await?;
            anyhow::Ok(())
        });
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n;
        }
        let secs = t.elapsed().as_secs_f64();
        writer.await??;
        ensure!(got == len, "got {got} of {len} bytes");
        ensure!(hasher.finalize() == sent_hash, "stream corrupted");
        Ok(secs)
    }

    #[tokio::test]
    async fn jitter_and_loss_keep_the_stream_intact() -> Result<()> {
        let _serial = exclusive().await;
        let (echo, echo_task) = tcp_echo().await?;
        let profile = LinkProfile::new(Duration::from_millis(100))
            .with_jitter(Duration::from_millis(20))
            .with_loss(0.01);
        let link = TcpLink::start(localhost(), echo, profile, 4).await?;
        let secs = stream_through(link.local_addr(), 5 << 20).await?;
        let stats = link.handle().stats();
        println!("tcp 100 ± 20 ms, 1 % loss: 5 MiB echoed intact in {secs:.2} s; {stats:?}");
        link.shutdown().await;
        echo_task.abort();
        Ok(())
    }

    #[tokio::test]
    async fn throughput_through_a_20ms_link() -> Result<()> {
        let _serial = exclusive().await;
        let (echo, echo_task) = tcp_echo().await?;
        let link = TcpLink::start(
            localhost(),
            echo,
            LinkProfile::new(Duration::from_millis(20)),
            5,
        )
        .await?;
        let len = 64 << 20;
        let secs = stream_through(link.local_addr(), len).await?;
        let mb_s = len as f64 / secs / 1e6;
        println!("tcp 20 ms link: {mb_s:.1} MB/s each way (64 MiB echoed in {secs:.2} s)");
        ensure!(mb_s >= 20.0, "{mb_s} MB/s");
        link.shutdown().await;
        echo_task.abort();
        Ok(())
    }

    #[tokio::test]
    async fn handle_cut_holds_bytes_and_restore_releases_them() -> Result<()> {
        let _serial = exclusive().await;
        let (echo, echo_task) = tcp_echo().await?;
        let link = TcpLink::start(
            localhost(),
            echo,
            LinkProfile::new(Duration::from_millis(100)),
            6,
        )
        .await?;
        let handle = link.handle().clone();
        let mut stream = connect(link.local_addr()).await?;
        round_trip(&mut stream, 8).await?;
        handle.cut();
        stream.write_all(b"held").await?;
        let mut buf = [0u8; 4];
        ensure!(
            tokio::time::timeout(Duration::from_millis(400), stream.read_exact(&mut buf))
                .await
                .is_err(),
            "bytes crossed a cut"
        );
        handle.restore();
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await??;
        ensure!(&buf == b"held");
        handle.set_rtt(Duration::from_millis(300))?;
        let slow = round_trip(&mut stream, 8).await?;
        println!("tcp handle: round trip after rtt 100 → 300 ms: {slow:.1} ms");
        ensure!((297.0..=308.0).contains(&slow), "{slow} ms");
        link.shutdown().await;
        echo_task.abort();
        Ok(())
    }

    #[tokio::test]
    async fn refused_target_closes_after_one_rtt() -> Result<()> {
        let _serial = exclusive().await;
        // A port with nothing listening: bind, read the port, drop.
        let dead = TcpListener::bind(localhost()).await?.local_addr()?;
        let link = TcpLink::start(
            localhost(),
            dead,
            LinkProfile::new(Duration::from_millis(50)),
            7,
        )
        .await?;
        let t = StdInstant::now();
        let mut stream = connect(link.local_addr()).await?;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
            .await?
            .unwrap_or(0);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(
            n == 0 && (48.0..=70.0).contains(&ms),
            "closed after {ms} ms"
        );
        ensure!(link.handle().stats().connect_failures == 1);
        link.shutdown().await;
        Ok(())
    }

    #[test]
    fn options_are_checked() {
        let bad = TcpOptions {
            chunk_bytes: 1 << 20,
            max_in_flight_bytes: 1 << 10,
            ..TcpOptions::default()
        };
        assert!(matches!(bad.validate(), Err(LinkError::Options(_))));
        assert!(TcpOptions::default().validate().is_ok());
    }
}
