//! Path MTU discovery over the mesh socket: quinn probes up to [`quic::MTU_UPPER_BOUND`],
//! and packets of that size still fit, whole, through the longest relayed path (two relays,
//! the largest mesh overhead) into the buffers quinn receives into.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::AsyncUdpSocket;
use skylane_shared::identity::{NodeKey, ShortId};
use skylane_shared::membership::{Member, Members, Role};
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::{quic, trust};

struct Node {
    key: NodeKey,
    socket: Arc<MeshSocket>,
    endpoint: quinn::Endpoint,
}

impl Node {
    fn id(&self) -> ShortId {
        self.key.id().short()
    }
}

/// Edge `a`, relays `r1` and `r2`, connector `d`, all knowing each other's addresses.
async fn four_nodes() -> Vec<Node> {
    let keys: Vec<NodeKey> = (0..4).map(|_| NodeKey::generate().expect("key")).collect();
    let role = |i: usize| if i == 3 { Role::Connector } else { Role::Edge };
    let members = Members::new(
        keys.iter()
            .enumerate()
            .map(|(i, k)| Member {
                id: k.id(),
                name: ["a", "r1", "r2", "d"][i].into(),
                role: role(i),
                address: None,
                region: None,
            })
            .collect(),
    )
    .expect("members");
    let mut nodes = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let socket = MeshSocket::bind("127.0.0.1:0".parse().expect("addr"), &key, members.clone())
            .await
            .expect("bind");
        let accept = (role(i) == Role::Connector).then(|| members.clone());
        let endpoint = quic::endpoint(socket.clone(), &key, accept).expect("endpoint");
        nodes.push(Node {
            key,
            socket,
            endpoint,
        });
    }
    for i in 0..4 {
        for j in 0..4 {
            if i != j {
                let addr = nodes[j].socket.udp_addr().expect("addr");
                nodes[i].socket.set_peer_addr(&nodes[j].key.id(), addr);
            }
        }
    }
    nodes
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[test]
fn the_mtu_ceiling_leaves_room_for_the_largest_mesh_header() {
    assert_eq!(quic::MTU_UPPER_BOUND, 1376);
}

#[tokio::test]
async fn mtu_discovery_reaches_the_ceiling_through_two_relays() {
    let nodes = four_nodes().await;
    let (a, r1, r2, d) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    // Linux always lets quinn-udp set don't-fragment; elsewhere it may not, and then quinn
    // rightly does not probe.
    if cfg!(target_os = "linux") {
        assert!(!a.socket.may_fragment(), "don't-fragment is set");
    } else if a.socket.may_fragment() {
        eprintln!("skipped: this platform can't set don't-fragment, so quinn won't probe");
        return;
    }
    a.socket
        .set_route(d.id(), Some(&[a.id(), r1.id(), r2.id(), d.id()]));
    d.socket
        .set_route(a.id(), Some(&[d.id(), r2.id(), r1.id(), a.id()]));

    let server = d.endpoint.clone();
    let echo = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("conn");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut buf = vec![0u8; 65536];
        while let Some(n) = recv.read(&mut buf).await.expect("read") {
            send.write_all(&buf[..n]).await.expect("write");
        }
        send.finish().expect("finish");
        let _ = conn.closed().await;
    });
    let conn = a
        .endpoint
        .connect_with(
            quic::client_config(&a.key, d.key.id()).expect("cfg"),
            virtual_addr(&d.key.id()),
            trust::MESH_SERVER_NAME,
        )
        .expect("connect")
        .await
        .expect("handshake over two relays");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut sent = Vec::new();
    let mut echoed = Vec::new();
    // Keep data flowing (full-size packets both ways) until discovery has settled.
    for round in 0..2000u32 {
        let msg: Vec<u8> = (0..20_000u32)
            .map(|i| ((i * 7 + round) % 251) as u8)
            .collect();
        send.write_all(&msg).await.expect("write");
        sent.extend_from_slice(&msg);
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| panic!("echo stalled at round {round}"))
            .expect("read");
        echoed.extend_from_slice(&got);
        if conn.stats().path.current_mtu == quic::MTU_UPPER_BOUND && round >= 20 {
            break;
        }
    }
    assert_eq!(sent, echoed, "every byte came back, in order");
    assert_eq!(
        conn.stats().path.current_mtu,
        quic::MTU_UPPER_BOUND,
        "quinn probed up to the ceiling"
    );
    send.finish().expect("finish");
    let _ = recv.read_to_end(1 << 20).await;
    conn.close(0u32.into(), b"done");
    let _ = echo.await;

    // Full-size packets crossed both relays whole: nothing was cut short on the way.
    for node in &nodes {
        let c = node.socket.counters();
        assert_eq!(count(&c.malformed), 0, "malformed at {}", node.id());
        assert_eq!(count(&c.bad_tag), 0, "bad tag at {}", node.id());
    }
    assert!(count(&r1.socket.counters().relayed_forwarded) > 0);
    assert!(count(&r2.socket.counters().relayed_forwarded) > 0);
    assert!(count(&d.socket.counters().relayed_received) > 0);
}
