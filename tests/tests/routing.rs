//! Mesh routing with the real binaries: a connector and three edges on loopback, the
//! direct path from edge-0 to the connector made slow by the user-space WAN emulator.
//! Traffic moves to a relay, and a websocket open across the relay survives its death.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use skylane_simulations::wan::{LinkProfile, UdpLink};
use skylane_tests::{Cluster, ClusterOptions, free_udp, metric, route_path};
use tokio_tungstenite::tungstenite::Message;

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_direct_path_moves_to_a_relay_and_a_websocket_survives_the_relays_death()
-> anyhow::Result<()> {
    relay_failover("quic", Kill::TheRelay).await
}

/// Every relay dies at once: the route falls back to the 200 ms direct path, 100 times the
/// relayed path's RTT, and the websocket carries on over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_survives_every_relay_dying_onto_the_slow_direct_path() -> anyhow::Result<()> {
    relay_failover("quic", Kill::EveryRelay).await
}

/// The same over WireGuard. The direct path's datagrams reach each end from another address
/// than the one it sends to (the slow link is a port-mapping hop, as a NAT would be): they
/// are taken because the member's authenticated frames come from there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_wireguard_survives_every_relay_dying_onto_the_slow_direct_path()
-> anyhow::Result<()> {
    relay_failover("wireguard", Kill::EveryRelay).await
}

/// The same over WireGuard: the edge's tunnel to the connector is WireGuard over the mesh
/// socket, its datagrams relayed unopened, the websocket a TCP flow inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_relayed_wireguard_survives_the_relays_death() -> anyhow::Result<()> {
    relay_failover("wireguard", Kill::TheRelay).await
}

/// What dies under the websocket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The relay edge-0's route goes through: it moves to the other relay.
    TheRelay,
    /// Both other edges: it falls back to the slow direct path.
    EveryRelay,
}

async fn relay_failover(transport: &'static str, kill: Kill) -> anyhow::Result<()> {
    // edge-0 → connector crosses a 200 ms link; every other pair is plain loopback.
    let connector_udp = free_udp();
    let slow = UdpLink::start(
        "127.0.0.1:0".parse()?,
        connector_udp,
        LinkProfile::new(Duration::from_millis(200)),
        7,
    )
    .await?;
    let opts = ClusterOptions {
        edges: 3,
        // Past the settling phase quickly, so the relay's death is a failover, not an
        // early adjustment.
        extra_config: "[routing]\nsettle_ms = 2000\n".into(),
        connector_udp: Some(connector_udp),
        connector_addr_for_edge: vec![Some(slow.local_addr())],
        connector_transport: transport,
        ..ClusterOptions::default()
    };
    let c = tokio::task::spawn_blocking(move || Cluster::start(opts)).await??;
    let edge0 = c.edges[0].admin;

    // The route settles on a relay.
    let started = Instant::now();
    let path = wait_for(Duration::from_secs(40), || {
        route_path(edge0, "connector").filter(|p| p.len() >= 3)
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("edge-0 never routed through a relay\n{}", c.logs()))?;
    println!("edge-0 routes {path:?} after {:?}", started.elapsed());
    // Past settling, failover rules apply.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = route_path(edge0, "connector").unwrap_or_default();
    anyhow::ensure!(path.len() >= 3, "edge-0 left the relays: {path:?}");
    let relay_name = path[1].clone();

    // The operator's view shows the same route, as a table.
    let out = std::process::Command::new(skylane_tests::bin("mesh-node"))
        .args(["status", "--admin", &edge0.to_string()])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mesh-node status failed: {out:?}");
    assert!(table.contains(&path.join(" → ")), "{table}");
    assert!(table.contains("MESH LINKS"), "{table}");
    let relay = c
        .edges
        .iter()
        .position(|e| e.proc.name == relay_name)
        .ok_or_else(|| anyhow::anyhow!("relay {relay_name} is not an edge"))?;

    // A websocket through edge-0, echoing over the relayed path.
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"http/1.1"]).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws", c.edges[0].https.port()),
        stream,
    )
    .await?;
    let mut echo = async |i: u32| -> anyhow::Result<Duration> {
        let sent = Instant::now();
        let msg = Message::Text(format!("message {i}").into());
        ws.send(msg.clone()).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => continue,
                Ok(Some(Ok(m))) if m == msg => return Ok(sent.elapsed()),
                Ok(other) => anyhow::bail!("message {i}: got {other:?}"),
                Err(_) => anyhow::bail!("message {i}: no echo within 10 s"),
            }
        }
    };
    let mut relayed_rtts = Vec::new();
    for i in 0..20 {
        relayed_rtts.push(echo(i).await?);
    }
    relayed_rtts.sort();
    let median = relayed_rtts[relayed_rtts.len() / 2];
    println!("websocket echo over the relay: median {median:?}");
    assert!(
        median < Duration::from_millis(80),
        "the relayed path must beat the 100+ ms direct one, got {median:?}"
    );
    if transport == "wireguard" {
        let status = skylane_tests::status(edge0).unwrap_or_default();
        let tunnel = status["tunnels"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["connector"] == "connector"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(tunnel["transport"], "wireguard", "{status:#}");
        assert!(
            status["frames"]["wireguard_sent"].as_u64().unwrap_or(0) >= 20,
            "{status:#}"
        );
    }
    let forwarded = skylane_tests::status(c.edges[relay].admin)
        .and_then(|s| s["frames"]["relayed_forwarded"].as_u64())
        .unwrap_or(0);
    assert!(
        forwarded >= 20,
        "{relay_name} forwarded only {forwarded} datagrams"
    );
    let sent_relayed = skylane_tests::status(edge0)
        .and_then(|s| s["frames"]["relayed_sent"].as_u64())
        .unwrap_or(0);
    assert!(
        sent_relayed >= 20,
        "edge-0 sent only {sent_relayed} relayed datagrams"
    );

    // Kill the relay; the websocket keeps echoing, every message in order.
    let mut c = c;
    c.edges[relay].proc.kill();
    if kill == Kill::EveryRelay {
        for e in 1..c.edges.len() {
            c.edges[e].proc.kill();
        }
    }
    let killed = Instant::now();
    println!("killed {relay_name} at {:?}", std::time::SystemTime::now());
    let route_log = |log: String| {
        log.lines()
            .filter(|l| l.contains("route changed"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut worst = Duration::ZERO;
    let mut i = 100;
    while killed.elapsed() < Duration::from_secs(6) {
        // On a stall, which end stayed on the dead relay, and when each moved.
        let echoed = echo(i).await.map_err(|e| {
            e.context(format!(
                "{:?} after the kill; route changes of edge-0:\n{}\nof the connector:\n{}",
                killed.elapsed(),
                route_log(c.edges[0].proc.log()),
                route_log(c.connector.log())
            ))
        })?;
        worst = worst.max(echoed);
        i += 1;
        // A chat-like pace, leaving the CPU to the nodes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = route_path(edge0, "connector").unwrap_or_default();
    println!(
        "after killing {relay_name}: route {after:?}, {} messages, slowest echo {worst:?}",
        i - 100
    );
    assert!(
        !after.contains(&relay_name),
        "the route must leave the dead relay: {after:?}"
    );
    println!(
        "edge-0:\n{}\nconnector:\n{}",
        route_log(c.edges[0].proc.log()),
        route_log(c.connector.log())
    );
    assert!(metric(edge0, "skylane_route_switches_total", "failover") >= 1.0);
    // Over WireGuard the websocket is a TCP flow inside the tunnel. A segment lost while the
    // route moved would wait for the userspace TCP's retransmission timeout (at least 1 s,
    // RFC 6298); the tunnel sends again what went unanswered as soon as the route moves, so
    // the stall is the route's failover, as over QUIC, with a little more room for the
    // TCP stack's own pace.
    // Both relays dying at once can cost two failovers in a row (to the other relay,
    // found dead in turn, then to the direct path).
    let stall_limit = match (transport, kill) {
        (_, Kill::EveryRelay) => Duration::from_millis(2500),
        ("wireguard", _) => Duration::from_millis(1500),
        _ => Duration::from_secs(1),
    };
    assert!(
        worst < stall_limit,
        "the websocket stalled for {worst:?} while the route failed over"
    );
    ws.send(Message::Close(None)).await?;

    // Membership (SWIM over the mesh) agrees the relay is gone, and everyone else is alive.
    let state = |admin, name: &str| {
        skylane_tests::status(admin).and_then(|s| {
            s["mesh"]["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == name)?["state"]
                .as_str()
                .map(str::to_owned)
        })
    };
    let down_after = wait_for(Duration::from_secs(20), || {
        (state(c.connector_admin, &relay_name).as_deref() == Some("down")).then(|| killed.elapsed())
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("the connector never saw {relay_name} down\n{}", c.logs()))?;
    println!("membership: {relay_name} down at the connector {down_after:?} after the kill");
    let survivors = |i: usize| i == 0 || (kill == Kill::TheRelay && i != relay);
    for (i, e) in c.edges.iter().enumerate().filter(|(i, _)| survivors(*i)) {
        assert_eq!(
            state(c.connector_admin, &e.proc.name).as_deref(),
            Some("alive"),
            "edge-{i}"
        );
    }
    drop(slow);
    Ok(())
}
