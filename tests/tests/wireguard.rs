//! Interop with stock WireGuard: the edge (boringtun + smoltcp in user space) reaches a
//! connector — or, with no connector at all, the origin — through Debian's `wireguard-go`
//! on a TUN device in a network namespace the test creates. Skipped, with the reason, where
//! there is no root, no `/dev/net/tun` or no WireGuard tools.

use std::time::Duration;

use futures_util::StreamExt as _;
use sha2::Digest as _;
use skylane_tests::wireguard::{Behind, WgWorld, unavailable};
use skylane_tests::{Cluster, ClusterOptions, pattern_sha256};

const MB: u64 = 1024 * 1024;

fn skip() -> bool {
    if let Some(why) = unavailable() {
        eprintln!(
            "SKIPPED: WireGuard interop tests need root, /dev/net/tun and wireguard-go: {why}"
        );
        return true;
    }
    false
}

/// An edge to test through, whatever is behind it.
struct Target<'a> {
    client: reqwest::Client,
    https: std::net::SocketAddr,
    tcp: std::net::SocketAddr,
    ca_pem: &'a std::path::Path,
    logs: &'a dyn Fn() -> String,
}

impl Target<'_> {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }
    fn logs(&self) -> String {
        (self.logs)()
    }
}

/// GET and POST of 50 MB bodies, streamed and checked by hash.
async fn fifty_megabytes_both_ways(w: &Target<'_>) -> anyhow::Result<()> {
    let client = &w.client;
    let resp = client
        .get(w.url(&format!("/bytes/{}", 50 * MB)))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "GET: {}\n{}", resp.status(), w.logs());
    let mut h = sha2::Sha256::new();
    let mut got = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        // The nodes' logs with the error: a body cut short is otherwise a bare h2 reset.
        let chunk = chunk.map_err(|e| anyhow::anyhow!("body: {e:#}\n{}", w.logs()))?;
        got += chunk.len() as u64;
        h.update(&chunk);
    }
    assert_eq!(got, 50 * MB);
    assert_eq!(hex::encode(h.finalize()), pattern_sha256(50 * MB));

    let chunk_len = 256 * 1024;
    let mut sent = sha2::Sha256::new();
    let mut chunks = Vec::new();
    for i in 0..(50 * MB) as usize / chunk_len {
        let c: Vec<u8> = (0..chunk_len)
            .map(|j| ((i * 7919 + j * 13) % 256) as u8)
            .collect();
        sent.update(&c);
        chunks.push(Ok::<_, std::io::Error>(bytes::Bytes::from(c)));
    }
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = client.post(w.url("/echo")).body(body).send().await?;
    anyhow::ensure!(
        resp.status() == 200,
        "POST: {}\n{}",
        resp.status(),
        w.logs()
    );
    let mut back = sha2::Sha256::new();
    let mut n = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        // The nodes' logs with the error: a body cut short is otherwise a bare h2 reset.
        let chunk = chunk.map_err(|e| anyhow::anyhow!("body: {e:#}\n{}", w.logs()))?;
        n += chunk.len() as u64;
        back.update(&chunk);
    }
    assert_eq!(n, 50 * MB);
    assert_eq!(back.finalize(), sent.finalize(), "the echoed body differs");
    Ok(())
}

/// 1,000 websocket round trips, every hundredth a 1 MB message.
async fn websocket_round_trips(w: &Target<'_>) -> anyhow::Result<()> {
    let tls = skylane_tests::tls_config(w.ca_pem, &[b"http/1.1"])?;
    let tcp = tokio::net::TcpStream::connect(w.https).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut ws, resp) = tokio_tungstenite::client_async_with_config(
        format!("wss://localhost:{}/ws", w.https.port()),
        stream,
        Some(config),
    )
    .await?;
    assert_eq!(resp.status(), 101);
    skylane_tests::websocket_echo_round_trips(&mut ws, 1_000, 100, || w.logs()).await?;
    ws.close(None).await?;
    Ok(())
}

/// Server-sent events arrive one by one, not buffered.
async fn server_sent_events(w: &Target<'_>) -> anyhow::Result<()> {
    let resp = w.client.get(w.url("/sse")).send().await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut events = 0;
    let started = std::time::Instant::now();
    while events < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("event stream ended"))??;
        events += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// A raw TCP service through the tunnel: HTTP spoken by hand over the edge's TCP port.
async fn raw_tcp(w: &Target<'_>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(w.tcp).await?;
    tcp.write_all(b"GET /health HTTP/1.0\r\nHost: origin\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut out)).await??;
    anyhow::ensure!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out:?}\n{}",
        w.logs()
    );
    Ok(())
}

/// The edge's status and the stock endpoint agree that a handshake happened.
fn status_shows_the_tunnel(w: &WgWorld) -> anyhow::Result<serde_json::Value> {
    let status = skylane_tests::status(w.admin).unwrap_or_default();
    let dump = w.wg_show();
    // `wg show dump`: the peer line's fifth field is the latest handshake (unix time).
    let handshake: u64 = dump
        .lines()
        .nth(1)
        .and_then(|l| l.split('\t').nth(4))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        handshake > 0,
        "wireguard-go saw no handshake:\n{dump}\n{}",
        w.logs()
    );
    Ok(status)
}

/// Everything [`Target`] checks, through the edge of a [`WgWorld`].
async fn the_data_path(w: &WgWorld) -> anyhow::Result<()> {
    let logs = || w.logs();
    let t = Target {
        client: w.client()?,
        https: w.https,
        tcp: w.tcp,
        ca_pem: &w.ca_pem,
        logs: &logs,
    };
    fifty_megabytes_both_ways(&t).await?;
    websocket_round_trips(&t).await?;
    server_sent_events(&t).await?;
    raw_tcp(&t).await
}

/// Between Skylane nodes: the connector's member entry says `transport = "wireguard"`, so
/// the edge tunnels to it with WireGuard over the mesh socket. Needs no root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_tunnels_to_a_wireguard_connector_over_the_mesh() -> anyhow::Result<()> {
    let c = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions {
            connector_transport: "wireguard",
            ..ClusterOptions::default()
        })
    })
    .await??;
    let logs = || c.logs();
    let t = Target {
        client: c.client(0)?,
        https: c.edges[0].https,
        tcp: c.edges[0].tcp,
        ca_pem: &c.ca_pem,
        logs: &logs,
    };
    fifty_megabytes_both_ways(&t).await?;
    websocket_round_trips(&t).await?;
    server_sent_events(&t).await?;
    raw_tcp(&t).await?;
    let status = skylane_tests::status(c.edges[0].admin).unwrap_or_default();
    let tunnel = status["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["connector"] == "connector"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tunnel["transport"], "wireguard", "{status:#}");
    assert_eq!(tunnel["wireguard"]["endpoint"], "mesh", "{status:#}");
    assert!(
        status["frames"]["wireguard_sent"].as_u64().unwrap_or(0) > 1000,
        "{status:#}"
    );
    assert_eq!(
        status["frames"]["quic_sent"].as_u64().unwrap_or(0),
        0,
        "no QUIC: {status:#}"
    );
    let connector = skylane_tests::status(c.connector_admin).unwrap_or_default();
    let from_edge = connector["wireguard_tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["peer"] == "edge-0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(from_edge["up"], true, "{connector:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_reaches_a_connector_through_stock_wireguard() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let w = WgWorld::start(Behind::Connector, "")?;
    the_data_path(&w).await?;
    let status = status_shows_the_tunnel(&w)?;
    let tunnel = status["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["connector"] == "connector-wg"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tunnel["transport"], "wireguard", "{status:#}");
    assert_eq!(tunnel["up"], true, "{status:#}");
    assert_eq!(
        tunnel["wireguard"]["endpoint"],
        w.endpoint.to_string(),
        "{status:#}"
    );
    assert!(
        tunnel["wireguard"]["rx_bytes"].as_u64().unwrap_or(0) > 100 * MB,
        "{status:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_reaches_the_origin_directly_through_stock_wireguard() -> anyhow::Result<()> {
    if skip() {
        return Ok(());
    }
    let w = WgWorld::start(Behind::Origin, "")?;
    the_data_path(&w).await?;
    let status = status_shows_the_tunnel(&w)?;
    let tunnel = status["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["connector"] == "web (direct)"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tunnel["transport"], "wireguard", "{status:#}");
    assert_eq!(tunnel["up"], true, "{status:#}");
    let headers = w
        .client()?
        .get(w.url("/headers"))
        .send()
        .await?
        .text()
        .await?;
    assert!(headers.contains("x-forwarded-for"), "{headers}");
    Ok(())
}

/// A websocket through a stock WireGuard tunnel keeps echoing when the edge's own way to
/// the endpoint dies: the tunnel moves to the other edge it lists in `relays`, which sends
/// its datagrams on from a socket of its own, and `wireguard-go` follows by roaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_tunnel_survives_its_own_way_dying_through_another_edge() -> anyhow::Result<()> {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    if skip() {
        return Ok(());
    }
    let w = WgWorld::start_with_relay()?;
    let relay = w.relay_edge.as_ref().expect("a relay edge");
    let path_of = |admin| {
        let status = skylane_tests::status(admin).unwrap_or_default();
        status["tunnels"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["connector"] == "connector-wg"))
            .map(|t| t["wireguard"]["path"].clone())
            .unwrap_or_default()
    };
    let tls = skylane_tests::tls_config(&w.ca_pem, &[b"http/1.1"])?;
    let tcp = tokio::net::TcpStream::connect(w.https).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?;
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", w.https.port()), stream)
            .await?;
    assert_eq!(resp.status(), 101);
    let mut echo = async |i: u32| -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let msg = Message::Text(format!("message {i}").into());
        ws.send(msg.clone()).await?;
        let back = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("message {i} not echoed in 15 s\n{}", w.logs()))?;
        match back {
            Some(Ok(m)) if m == msg => Ok(started.elapsed()),
            other => anyhow::bail!("message {i}: {other:?}\n{}", w.logs()),
        }
    };
    for i in 0..50 {
        echo(i).await?;
    }
    assert_eq!(path_of(w.admin), "direct");
    w.cut_own_way()?;
    let cut = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 50..300 {
        slowest = slowest.max(echo(i).await?);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "250 echoes across the cut in {:?}; the slowest took {slowest:?}",
        cut.elapsed()
    );
    assert_eq!(path_of(w.admin), "via edge-b", "{}", w.logs());
    // The endpoint now sees this edge at edge-b's relay socket, not at its own port.
    let dump = w.wg_show();
    let own = format!(":{}", relay.own_port);
    assert!(
        dump.lines().all(|l| !l.contains(&own)),
        "the endpoint still sends to the cut port:\n{dump}"
    );
    let carried = skylane_tests::status(relay.admin).unwrap_or_default();
    assert!(
        carried["wireguard_relay"]["counters"]["carried_out"]
            .as_u64()
            .unwrap_or(0)
            > 100,
        "{carried:#}"
    );
    assert_eq!(carried["wireguard_relay"]["carried_now"], 1, "{carried:#}");
    // About a second to judge the way dead, then what it swallowed goes again.
    assert!(slowest < Duration::from_secs(4), "slowest echo {slowest:?}");
    // New requests go the same way.
    let resp = w.client()?.get(w.url("/bytes/1000000")).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?.len(), 1_000_000);
    Ok(())
}
