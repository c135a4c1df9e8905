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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use skylane_shared::identity::NodeKey;
use skylane_shared::membership::{Member, Members, Role};
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::{quic, trust};

const CHUNK: usize = 64 * 1024;
/// Far beyond what a run takes; a hang fails instead of blocking the shared machine.
const LIMIT: Duration = Duration::from_secs(120);

struct Node {
    key: NodeKey,
    socket: Arc<MeshSocket>,
    endpoint: quinn::Endpoint,
}

async fn nodes(n: usize) -> anyhow::Result<Vec<Node>> {
    let keys: Vec<NodeKey> = (0..n)
        .map(|_| NodeKey::generate())
        .collect::<Result<_, _>>()?;
    // The last node is the connector; the others are edges.
    let role = |i: usize| {
        if i + 1 == n {
            Role::Connector
        } else {
            Role::Edge
        }
    };
    let members = Members::new(
        keys.iter()
            .enumerate()
            .map(|(i, k)| Member {
                id: k.id(),
                name: format!("n{i}"),
                role: role(i),
                address: None,
                region: None,
            })
            .collect(),
    )?;
    let mut nodes = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let socket = MeshSocket::bind("127.0.0.1:0".parse()?, &key, members.clone()).await?;
        let accept = (role(i) == Role::Connector).then(|| members.clone());
        let endpoint = quic::endpoint(socket.clone(), &key, accept)?;
        nodes.push(Node {
            key,
            socket,
            endpoint,
        });
    }
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let addr = nodes[j].socket.udp_addr()?;
                nodes[i].socket.set_peer_addr(&nodes[j].key.id(), addr);
            }
        }
    }
    Ok(nodes)
}

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
    let conn = edge
        .endpoint
        .connect_with(
            quic::client_config(&edge.key, conn_node.key.id())?,
            virtual_addr(&conn_node.key.id()),
            trust::MESH_SERVER_NAME,
        )?
        .await?;
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
    let direct = nodes(2).await?;
    tokio::time::timeout(LIMIT, stream("direct", &direct, mib)).await??;

    let relayed = nodes(3).await?;
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
