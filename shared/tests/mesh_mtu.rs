//! Path MTU discovery over the mesh socket: quinn probes up to [`quic::MTU_UPPER_BOUND`],
//! and packets of that size still fit, whole, through the longest relayed path (two relays,
//! the largest mesh overhead) into the buffers quinn receives into.

use quinn::AsyncUdpSocket;
use skylane_shared::quic;

mod support;

use support::{count, echo_round, mesh, spawn_echo};

#[test]
fn the_mtu_ceiling_leaves_room_for_the_largest_mesh_header() {
    assert_eq!(quic::MTU_UPPER_BOUND, 1376);
}

#[tokio::test]
async fn mtu_discovery_reaches_the_ceiling_through_two_relays() {
    // Edge `a`, relays `r1` and `r2`, connector `d`.
    let nodes = mesh(&["a", "r1", "r2", "d"]).await.expect("mesh");
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

    let echo = spawn_echo(d.endpoint.clone(), 65536);
    let conn = a.connect(d).await.expect("handshake over two relays");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut sent = Vec::new();
    let mut echoed = Vec::new();
    // Keep data flowing (full-size packets both ways) until discovery has settled.
    for round in 0..2000u32 {
        echo_round(&mut send, &mut recv, round, 20_000, &mut sent, &mut echoed).await;
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
