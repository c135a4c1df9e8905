//! Whole-path throughput of one QUIC connection over mesh sockets on loopback: a bounded
//! measurement, not a timed test, so it is `#[ignore]`d. Run it in release mode:
//!
//! ```text
//! cargo test --release -p skylane-shared --test mesh_throughput -- --ignored --nocapture
//! ```
//!
//! It streams `SKYLANE_BENCH_MIB` MiB (default 256) from the connector to the edge, once on
//! the direct path and once through a relay, and prints MB/s, the QUIC datagrams the sender
//! handed to the socket per MiB, and the path MTU quinn settled on.
//!
//! Measured on the shared 2-core dev VM (Linux 6.18), the binary built before batching
//! (commit e9f00d7) and after (GSO/GRO + PLPMTUD), run alternately three times each:
//!
//! | | before | after |
//! |---|---|---|
//! | direct MB/s | 197–202 | 723–767 |
//! | relayed MB/s | 151–159 | 351–359 |
//! | QUIC datagrams / MiB | 973–976 direct, 900 relayed | 790–804 direct, 784 relayed |
//! | path MTU | 1200 | 1376 |
//! | UDP syscalls, 32 MiB direct + 32 MiB relayed (`strace -f -c`) | 193 038 | 12 673 |

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

const CHUNK: usize = 64 * 1024;
/// Far beyond what a run takes; a hang fails instead of blocking the shared machine.
const LIMIT: Duration = Duration::from_secs(120);

mod support;

use support::{Node, mesh};

/// Streams `mib` MiB from the last node to the first and prints what it took.
async fn stream(label: &str, nodes: &[Node], mib: usize) -> anyhow::Result<()> {
    let (edge, conn_node) = (&nodes[0], &nodes[nodes.len() - 1]);
    let server = conn_node.endpoint.clone();
    let total = mib * 1024 * 1024;
    let sender = tokio::spawn(async move {
        let conn = server.accept().await.context("incoming")?.await?;
        // Tunnels carry bidirectional streams only (`max_concurrent_uni_streams(0)`).
        let (mut send, _recv) = conn.accept_bi().await?;
        let chunk = vec![0x5au8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            send.write_all(&chunk[..n]).await?;
            left -= n;
        }
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok(())
    });
    let conn = edge.connect(conn_node).await?;
    let before = conn_node
        .socket
        .counters()
        .quic_sent
        .load(Ordering::Relaxed);
    let (mut hello, mut recv) = conn.open_bi().await?;
    // A stream is announced to the peer with its first byte.
    hello.write_all(b"go").await?;
    let start = Instant::now();
    let mut got = 0usize;
    while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
        got += chunk.bytes.len();
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(got == total, "received {got} of {total} bytes");
    let sent = conn_node
        .socket
        .counters()
        .quic_sent
        .load(Ordering::Relaxed)
        - before;
    let mtu = conn.stats().path.current_mtu;
    conn.close(0u32.into(), b"done");
    tokio::time::timeout(Duration::from_secs(5), sender).await???;
    println!(
        "{label}: {mib} MiB in {:.2} s = {:.0} MB/s, {:.0} datagrams/MiB (quic_sent {sent}), path MTU {mtu}",
        elapsed.as_secs_f64(),
        total as f64 / 1e6 / elapsed.as_secs_f64(),
        sent as f64 / mib as f64,
    );
    Ok(())
}

fn bench_mib() -> usize {
    std::env::var("SKYLANE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
async fn throughput_direct_and_relayed() -> anyhow::Result<()> {
    let mib = bench_mib();
    let direct = mesh(&["edge", "connector"]).await?;
    tokio::time::timeout(LIMIT, stream("direct", &direct, mib)).await??;

    let relayed = mesh(&["edge", "relay", "connector"]).await?;
    let (a, r, d) = (&relayed[0], &relayed[1], &relayed[2]);
    let (ai, ri, di) = (a.key.id().short(), r.key.id().short(), d.key.id().short());
    a.socket.set_route(di, Some(&[ai, ri, di]));
    d.socket.set_route(ai, Some(&[di, ri, ai]));
    tokio::time::timeout(LIMIT, stream("relayed", &relayed, mib)).await??;
    println!(
        "relay forwarded {} datagrams",
        r.socket
            .counters()
            .relayed_forwarded
            .load(Ordering::Relaxed)
    );
    Ok(())
}
