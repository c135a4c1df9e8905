//! The mesh socket's relayed paths with real quinn endpoints on loopback: a QUIC
//! connection rides a relay, moves between paths mid-stream without noticing, and the
//! relay refuses strangers, forged headers and replays.

use std::time::Duration;

use skylane_shared::identity::NodeKey;
use skylane_shared::mesh::auth::TAG_LEN;
use skylane_shared::mesh::frame::{self, BodyType};
use skylane_shared::mesh::virtual_addr;
use skylane_shared::{quic, trust};

mod support;

use support::{Node, count, echo_round, mesh, spawn_echo};

/// Edge `a`, relay edge `r`, connector `d`, all knowing each other's addresses.
async fn three_nodes() -> (Node, Node, Node) {
    let mut nodes = mesh(&["a", "r", "d"]).await.expect("mesh");
    let d = nodes.pop().expect("d");
    let r = nodes.pop().expect("r");
    let a = nodes.pop().expect("a");
    (a, r, d)
}

fn relay_via(from: &Node, relay: &Node, to: &Node) {
    from.relay_via(relay, to);
}

fn direct(from: &Node, to: &Node) {
    from.socket.set_route(to.id(), None);
}

#[tokio::test]
async fn quic_rides_a_relay_and_survives_path_changes_and_the_relays_death() {
    let (a, r, d) = three_nodes().await;
    relay_via(&a, &r, &d);
    relay_via(&d, &r, &a);
    let echo = spawn_echo(d.endpoint.clone(), 4096);
    let conn = a.connect(&d).await.expect("handshake over the relay");
    assert!(count(&r.socket.counters().relayed_forwarded) > 0);
    assert!(count(&d.socket.counters().relayed_received) > 0);

    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut sent = Vec::new();
    let mut echoed = Vec::new();
    for round in 0..300u32 {
        // Move the path under the live connection: relay, direct, relay, then kill the
        // relay and fail over to direct, as the control loop would.
        match round {
            60 => {
                direct(&a, &d);
                direct(&d, &a);
            }
            120 => {
                relay_via(&a, &r, &d);
                relay_via(&d, &r, &a);
            }
            180 => r.endpoint.close(0u32.into(), b"relay dies"),
            190 => {
                direct(&a, &d);
                direct(&d, &a);
            }
            _ => {}
        }
        echo_round(&mut send, &mut recv, round, 1000, &mut sent, &mut echoed).await;
    }
    assert_eq!(
        sent, echoed,
        "no byte lost or reordered across path changes"
    );
    send.finish().expect("finish");
    let _ = recv.read_to_end(1 << 16).await;
    conn.close(0u32.into(), b"done");
    let _ = echo.await;
}

#[tokio::test]
async fn relays_refuse_strangers_forgeries_and_replays() {
    let (a, r, d) = three_nodes().await;
    // A spy sits where `a` believes the relay is, to capture one genuine relayed frame.
    let spy = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("spy");
    a.socket
        .set_peer_addr(&r.key.id(), spy.local_addr().expect("addr"));
    relay_via(&a, &r, &d);
    let _attempt = a.endpoint.connect_with(
        quic::client_config(&a.key, d.key.id()).expect("cfg"),
        virtual_addr(&d.key.id()),
        trust::MESH_SERVER_NAME,
    );
    let mut genuine = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), spy.recv(&mut genuine))
        .await
        .expect("a sends into the relayed path")
        .expect("recv");
    genuine.truncate(n);
    // From now on `a` retransmits straight to `d`, so the spy hears only replies to it.
    direct(&a, &d);

    // Delivered once: forwarded. Delivered again: a replay, dropped.
    spy.send_to(&genuine, r.udp()).await.expect("send");
    spy.send_to(&genuine, r.udp()).await.expect("send");
    // Altered in flight: the tag no longer verifies.
    let mut altered = genuine.clone();
    let last = altered.len() - TAG_LEN - 1;
    altered[last] ^= 1;
    spy.send_to(&altered, r.udp()).await.expect("send");
    // A stranger asks the relay to forward to `d`, under its own id.
    let stranger = NodeKey::generate().expect("key").id().short();
    let mut forged = Vec::new();
    frame::encode_auth_header(&mut forged, stranger, r.id(), 1, BodyType::Relay);
    frame::encode_relay_header(&mut forged, 1, &[stranger, r.id(), d.id()]);
    forged.extend_from_slice(b"not quic");
    forged.extend_from_slice(&[0u8; TAG_LEN]);
    spy.send_to(&forged, r.udp()).await.expect("send");
    // The stranger claims to be `a`, but cannot make the tag.
    let mut claimed = Vec::new();
    frame::encode_auth_header(&mut claimed, a.id(), r.id(), u64::MAX / 2, BodyType::Relay);
    frame::encode_relay_header(&mut claimed, 1, &[a.id(), r.id(), d.id()]);
    claimed.extend_from_slice(b"not quic");
    claimed.extend_from_slice(&[7u8; TAG_LEN]);
    spy.send_to(&claimed, r.udp()).await.expect("send");

    let c = r.socket.counters();
    tokio::time::timeout(Duration::from_secs(5), async {
        while count(&c.relayed_forwarded) < 1
            || count(&c.replayed) < 1
            || count(&c.bad_tag) < 2
            || count(&c.non_member) < 1
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every frame was judged");
    assert_eq!(
        count(&c.relayed_forwarded),
        1,
        "only the genuine frame is forwarded"
    );
    assert_eq!(count(&c.replayed), 1);
    assert_eq!(count(&c.bad_tag), 2);
    assert_eq!(count(&c.non_member), 1);
    // Nothing came back to the sender of the refused frames: no reflection.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), spy.recv(&mut buf))
            .await
            .is_err()
    );
}
