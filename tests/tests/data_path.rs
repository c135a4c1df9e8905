//! The data path end to end: real edge, connector and origin processes on loopback,
//! real clients over TLS.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use sha2::Digest as _;
use skylane_tests::{Cluster, ClusterOptions, metric, pattern_sha256};

const MB: u64 = 1024 * 1024;

/// Downloads `/bytes/{len}` through edge 0 and checks length and checksum, hashing the
/// body as it arrives, never holding it.
async fn download_pattern(c: &Cluster, client: &reqwest::Client, len: u64) -> anyhow::Result<()> {
    let resp = client
        .get(c.url(0, &format!("/bytes/{len}")))
        .send()
        .await?;
    assert_eq!(resp.status(), 200, "{}", c.logs());
    let mut stream = resp.bytes_stream();
    let mut h = sha2::Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        got += chunk.len() as u64;
        h.update(&chunk);
    }
    assert_eq!(got, len);
    assert_eq!(hex::encode(h.finalize()), pattern_sha256(len));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabyte_bodies_stream_both_ways() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;

    // Download: hash as it arrives, never holding the body.
    download_pattern(&c, &client, 50 * MB).await?;

    // Upload and echo: the request body is produced in chunks as it is sent.
    let chunk_len = 256 * 1024;
    let chunks = (50 * MB) as usize / chunk_len;
    let mut sent_hash = sha2::Sha256::new();
    let mut bodies = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let chunk: Vec<u8> = (0..chunk_len)
            .map(|j| ((i * 7919 + j * 13) % 256) as u8)
            .collect();
        sent_hash.update(&chunk);
        bodies.push(Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)));
    }
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(bodies));
    let resp = client.post(c.url(0, "/echo")).body(body).send().await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut back = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        back.update(&chunk);
    }
    assert_eq!(n, 50 * MB);
    assert_eq!(back.finalize(), sent_hash.finalize());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_hundred_concurrent_streams_on_one_connection() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"h2"]).await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("https://localhost/bytes/{}", 1000 + i))
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            anyhow::ensure!(status == 200, "status {status}");
            anyhow::ensure!(body.len() as u64 == 1000 + i, "length {}", body.len());
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ten_thousand_round_trips_and_close_code() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let c = Cluster::start(ClusterOptions::default())?;
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"http/1.1"]).await?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut ws, resp) = tokio_tungstenite::client_async_with_config(
        format!("wss://localhost:{}/ws", c.edges[0].https.port()),
        stream,
        Some(config),
    )
    .await?;
    assert_eq!(resp.status(), 101);
    skylane_tests::websocket_echo_round_trips(&mut ws, 10_000, 1000, || c.logs()).await?;
    // Ping/pong passes through.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await?;
    match ws.next().await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there"),
        other => anyhow::bail!("expected a pong, got {other:?}"),
    }
    // A close code chosen by the origin reaches the client.
    ws.send(Message::Text("close:4001:bye now".into())).await?;
    let frame = loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => anyhow::bail!("expected a close frame, got {other:?}"),
        }
    };
    let frame = frame.expect("close frame with a code");
    assert_eq!(frame.code, CloseCode::from(4001));
    assert_eq!(frame.reason.as_str(), "bye now");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_they_are_sent() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let resp = c.client(0)?.get(c.url(0, "/sse")).send().await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = 0;
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let sent_ms: i64 = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| d.trim().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no data in {event:?}"))?;
            let delay = now_ms - sent_ms;
            assert!(
                delay < 200,
                "event {events} arrived {delay} ms after it was sent"
            );
            events += 1;
        }
    }
    assert_eq!(events, 20, "expected 20 events");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_is_503_and_back_up_is_served() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;
    assert_eq!(client.get(c.url(0, "/health")).send().await?.status(), 200);
    let origin_addr = c.origin.addr;
    c.origin.proc.kill();
    // Health checks every 200 ms, down after 2 failures: well within 2 s.
    let started = Instant::now();
    loop {
        let status = client.get(c.url(0, "/api/time")).send().await?.status();
        if status == 503 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still {status} after 3 s\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = client
        .get(c.url(0, "/api/time"))
        .send()
        .await?
        .text()
        .await?;
    assert!(page.contains("503"), "{page}");
    c.origin = skylane_tests::start_origin(&origin_addr.to_string(), "origin-1", c.dir.path())?;
    let started = Instant::now();
    loop {
        if client.get(c.url(0, "/api/time")).send().await?.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "origin not served again\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            c.connector_admin,
            "skylane_connector_refused_total",
            "no_healthy_origin"
        ) >= 1.0
    );
    assert!(
        metric(
            c.edges[0].admin,
            "skylane_edge_errors_total",
            "no_healthy_origin"
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_restart_is_served_again_within_two_seconds() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;
    assert_eq!(client.get(c.url(0, "/health")).send().await?.status(), 200);
    c.restart_connector()?;
    let restarted = Instant::now();
    loop {
        let status = client.get(c.url(0, "/health")).send().await?.status();
        if status == 200 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(2),
            "not served 2 s after the restart\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "served again {} ms after the connector restarted",
        restarted.elapsed().as_millis()
    );
    Ok(())
}

/// With one connector, a request that arrives while the edge's tunnel is down waits for it
/// to come back (a restart), instead of being answered 502 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_while_the_only_tunnel_is_down_waits_for_it() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;
    assert_eq!(client.get(c.url(0, "/health")).send().await?.status(), 200);
    c.stop_connector();
    let admin = c.edges[0].admin;
    let stopped = Instant::now();
    while metric(admin, "skylane_tunnel_up", "connector") > 0.0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the edge did not see its tunnel drop\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Instant::now();
    let request = tokio::spawn(client.get(c.url(0, "/health")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.start_connector()?;
    let resp = request.await??;
    let waited = sent.elapsed();
    assert_eq!(resp.status(), 200, "{}", c.logs());
    // It was answered by the connector that started after it was sent.
    assert!(
        waited >= Duration::from_millis(300),
        "answered in {waited:?}"
    );
    eprintln!(
        "the request waited {} ms for the tunnel",
        waited.as_millis()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_timeout_is_504_and_unknown_service_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        response_timeout_ms: 500,
        ..Default::default()
    })?;
    let client = c.client(0)?;
    let resp = client.get(c.url(0, "/delay/2000")).send().await?;
    assert_eq!(resp.status(), 504);
    let resp = client.get(c.url(0, "/unknown-service/x")).send().await?;
    assert_eq!(resp.status(), 502);
    assert!(
        metric(
            c.connector_admin,
            "skylane_connector_refused_total",
            "unknown_service"
        ) >= 1.0
    );
    // The connector still serves known services afterwards.
    assert_eq!(client.get(c.url(0, "/health")).send().await?.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_rewritten() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;
    let resp = client
        .get(c.url(0, "/headers"))
        .header("connection", "x-hop")
        .header("x-hop", "must not pass")
        .header("x-request-id", "test-id-1")
        .send()
        .await?;
    assert_eq!(resp.status(), 200, "{}", c.logs());
    assert_eq!(resp.headers()["x-request-id"], "test-id-1");
    let seen: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
    let h = |k: &str| seen.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    assert_eq!(h("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("https"));
    assert!(
        h("forwarded").is_some_and(|f| f.contains("for=127.0.0.1") && f.contains("proto=https"))
    );
    assert_eq!(
        h("host"),
        Some(format!("localhost:{}", c.edges[0].https.port()))
    );
    assert_eq!(h("x-hop"), None);
    assert_eq!(h("x-request-id").as_deref(), Some("test-id-1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_service_is_tunnelled() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let c = Cluster::start(ClusterOptions::default())?;
    // `echo-tcp` points at the origin's HTTP port; speak HTTP/1.0 over the raw tunnel.
    let mut tcp = tokio::net::TcpStream::connect(c.edges[0].tcp).await?;
    tcp.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut out)).await??;
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    assert!(out.ends_with("ok"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions::default())?;
    let client = c.client(0)?;
    let url = c.url(0, "/delay/800");
    let slow = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.edges[0].proc.terminate();
    let status = slow.await??;
    assert_eq!(
        status, 200,
        "the in-flight request must finish during the drain"
    );
    let code = c.edges[0].proc.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "edge should exit cleanly after draining");
    Ok(())
}

/// RFC 8441: a websocket over HTTP/2 extended CONNECT, from hyper's HTTP/2 client over TLS
/// to the edge, which carries it to the HTTP/1.1 origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_extended_connect() -> anyhow::Result<()> {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let c = Cluster::start(ClusterOptions::default())?;
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"h2"]).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    // A plain request first, so the edge's SETTINGS (with ENABLE_CONNECT_PROTOCOL) are in.
    let url = c.url(0, "/health");
    let res = sender
        .send_request(http::Request::get(&url).body(Empty::<bytes::Bytes>::new())?)
        .await?;
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);

    let mut req = http::Request::connect(c.url(0, "/ws"))
        .header(http::header::SEC_WEBSOCKET_VERSION, "13")
        .body(Empty::<bytes::Bytes>::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut res = sender.send_request(req).await?;
    assert_eq!(res.status(), 200, "extended CONNECT refused: {res:?}");
    let upgraded = hyper::upgrade::on(&mut res).await?;
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    let big: Vec<u8> = (0..MB as usize).map(|i| (i % 251) as u8).collect();
    for i in 0..200u32 {
        let msg = match i {
            199 => Message::Binary(big.clone().into()),
            n if n % 2 == 0 => Message::Text(format!("over h2 {i}").into()),
            _ => Message::Binary(i.to_be_bytes().to_vec().into()),
        };
        ws.send(msg.clone()).await?;
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed at message {i}"))??;
        assert_eq!(back, msg, "message {i} came back changed");
    }
    // A close code from the origin passes through.
    ws.send(Message::Text("close:4001:bye".into())).await?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::from(4001));
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => anyhow::bail!("expected close 4001, got {other:?}"),
    }
    Ok(())
}

/// The edge's tunnel connections to the connector, from its `/status`.
fn tunnel_connections(c: &Cluster) -> u64 {
    skylane_tests::status(c.edges[0].admin)
        .map_or(0, |s| s["tunnels"][0]["connections"].as_u64().unwrap_or(0))
}

/// With a shard per thread (`node.worker_threads = 3` at the edge), client connections go
/// to each shard in turn, and each shard's requests get a tunnel connection of its own
/// (dialled from that shard, so its driver runs there too); before it is up they use
/// another shard's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_of_the_edge_gets_a_tunnel_connection_of_its_own() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        worker_threads: Some(3),
        ..ClusterOptions::default()
    })?;
    assert_eq!(tunnel_connections(&c), 1, "{}", c.logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel_connections(&c) < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} tunnel connections\n{}",
            tunnel_connections(&c),
            c.logs()
        );
        // A new client is a new connection, on the next shard.
        let body = c.client(0)?.get(c.url(0, "/bytes/100")).send().await?;
        assert_eq!(body.error_for_status()?.bytes().await?.len(), 100);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every shard has its own now: more requests open no more.
    for _ in 0..6 {
        let body = c.client(0)?.get(c.url(0, "/bytes/100")).send().await?;
        assert_eq!(body.error_for_status()?.bytes().await?.len(), 100);
    }
    assert_eq!(tunnel_connections(&c), 3, "{}", c.logs());
    Ok(())
}

/// `node.worker_threads = 1` runs each node on a single-threaded runtime: bodies, many
/// concurrent HTTP/2 streams and a websocket all still flow through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_threaded_nodes_serve_the_whole_data_path() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let c = Cluster::start(ClusterOptions {
        worker_threads: Some(1),
        ..ClusterOptions::default()
    })?;
    let client = c.client(0)?;
    let len = 5 * MB;
    download_pattern(&c, &client, len).await?;
    let upload: Vec<u8> = (0..len as usize).map(|i| (i % 241) as u8).collect();
    let resp = client
        .post(c.url(0, "/echo"))
        .body(upload.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await? == upload, "the echo came back changed");

    let requests = (0..200u64).map(|i| {
        let client = client.clone();
        let url = c.url(0, &format!("/bytes/{}", 100 + i));
        async move {
            let body = client
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            anyhow::ensure!(body.len() as u64 == 100 + i, "length {}", body.len());
            anyhow::Ok(())
        }
    });
    for result in futures_util::future::join_all(requests).await {
        result?;
    }

    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"http/1.1"]).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws", c.edges[0].https.port()),
        stream,
    )
    .await?;
    for i in 0..200u32 {
        let msg = Message::Binary(i.to_be_bytes().to_vec().into());
        ws.send(msg.clone()).await?;
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("websocket closed"))??;
        assert_eq!(back, msg);
    }
    // One thread, one shard: the edge's first tunnel connection carried everything.
    assert_eq!(tunnel_connections(&c), 1, "{}", c.logs());
    Ok(())
}
