//! Edge policy with real clients against the real binaries: rate limits, timeouts, the
//! client address, "under attack" across the mesh, tunnel capacity and overload.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use sha2::Digest as _;
use skylane_tests::{Cluster, ClusterOptions, metric};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const UNDER_ATTACK: &str =
    "[under_attack]\nsecret_file = \"keys/challenge.secret\"\ndifficulty_bits = 10\n";

/// A TLS connection to `edge` from `source` (a 127.x address standing in for a client).
async fn tls_from(
    c: &Cluster,
    edge: usize,
    source: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    let tcp = socket.connect(c.edges[edge].https).await?;
    let tls = skylane_tests::tls_config(&c.ca_pem, alpn)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?)
}

/// One HTTP/1.1 request on a fresh connection from `source`; the status and head lines.
async fn get_from(
    c: &Cluster,
    edge: usize,
    source: &str,
    path: &str,
    extra_headers: &str,
) -> anyhow::Result<(u16, String, String)> {
    let mut tls = tls_from(c, edge, source, &[b"http/1.1"]).await?;
    tls.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra_headers}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    // Read to the end, or only the head of a 101 (the upgraded connection stays open).
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        if buf.starts_with(b"HTTP/1.1 101") && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_rate_limit_comes_429_with_retry_after() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        routes: Some(
            "[[routes]]\nhost = \"*\"\nservice = \"web\"\nrate_limits = [\"slow\"]\n".into(),
        ),
        edge_config: "[[rate_limits]]\nname = \"slow\"\nrequests_per_s = 0.5\nburst = 3\n".into(),
        ..ClusterOptions::default()
    })?;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get_from(&c, 0, "127.0.0.21", "/api/time", "").await?);
    }
    let codes: Vec<u16> = statuses.iter().map(|s| s.0).collect();
    assert_eq!(codes, [200, 200, 200, 429], "{}", c.logs());
    let retry: u64 = header(&statuses[3].1, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another client is not limited by the first one's bucket.
    assert_eq!(get_from(&c, 0, "127.0.0.22", "/api/time", "").await?.0, 200);
    assert!(metric(c.edges[0].admin, "skylane_edge_rate_limited_total", "slow") >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_cut_off_at_the_head_timeout() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        edge_config: "[timeouts]\nrequest_head_ms = 1000\n".into(),
        ..ClusterOptions::default()
    })?;
    let mut tls = tls_from(&c, 0, "127.0.0.31", &[b"http/1.1"]).await?;
    let started = Instant::now();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    // Drip a header line every 300 ms: each one arrives, but the head never ends.
    let mut closed_after = None;
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if tls
            .write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), tls.read(&mut b)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after =
        closed_after.ok_or_else(|| anyhow::anyhow!("a dripping client was never cut off"))?;
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_millis(2500),
        "cut after {closed_after:?}"
    );
    assert!(
        metric(
            c.edges[0].admin,
            "skylane_edge_connections_closed_total",
            "slow_head"
        ) >= 1.0
    );
    // A connection that sends nothing after the handshake is cut the same way.
    let mut idle = tls_from(&c, 0, "127.0.0.32", &[b"http/1.1"]).await?;
    let mut b = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut b)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "an idle TLS connection must be closed: {read:?}"
    );
    // A normal client is served meanwhile.
    assert_eq!(get_from(&c, 0, "127.0.0.33", "/health", "").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_for_does_not_reach_the_origin() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let (status, _, body) = get_from(
        &c,
        0,
        "127.0.0.41",
        "/headers",
        "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
    )
    .await?;
    assert_eq!(status, 200);
    assert!(
        !body.contains("6.6.6.6"),
        "the origin saw the forged address:\n{body}"
    );
    let seen: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.41", "{body}");
    assert_eq!(seen["x-real-ip"], "127.0.0.41", "{body}");
    assert_eq!(
        seen["forwarded"], "for=127.0.0.41;proto=https;host=\"localhost\"",
        "{body}"
    );
    Ok(())
}

/// The challenge page's token and difficulty.
fn page_challenge(page: &str) -> Option<(String, u32)> {
    let token = page
        .split("TOKEN = \"")
        .nth(1)?
        .split('"')
        .next()?
        .to_owned();
    let bits = page
        .split("BITS = ")
        .nth(1)?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some((token, bits))
}

fn solve(token: &str, bits: u32) -> u64 {
    (0u64..)
        .find(|n| {
            let d = sha2::Sha256::digest(format!("{token}.{n}").as_bytes());
            let mut zeros = 0;
            for b in d.iter() {
                if *b == 0 {
                    zeros += 8;
                } else {
                    zeros += b.leading_zeros();
                    break;
                }
            }
            zeros >= bits
        })
        .unwrap_or(0)
}

async fn admin_post(admin: SocketAddr, path: &str, body: &str) -> anyhow::Result<u16> {
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_attack_switched_at_one_edge_holds_at_the_other_within_a_second() -> anyhow::Result<()>
{
    let c = Cluster::start(ClusterOptions {
        edges: 2,
        challenge_secret: true,
        routes: Some(
            "[[routes]]\nhost = \"*\"\nservice = \"web\"\n\n[[routes]]\nhost = \"*\"\npath_prefix = \"/api/\"\nservice = \"web\"\napi = true\n".into(),
        ),
        edge_config: UNDER_ATTACK.into(),
        ..ClusterOptions::default()
    })?;
    let html = "Accept: text/html\r\n";
    assert_eq!(get_from(&c, 1, "127.0.0.51", "/", html).await?.0, 200);
    assert_eq!(
        admin_post(
            c.edges[0].admin,
            "/under-attack",
            r#"{"host": "localhost", "on": true}"#
        )
        .await?,
        200
    );
    let switched = Instant::now();
    let mut in_force_after = None;
    while switched.elapsed() < Duration::from_secs(3) {
        if get_from(&c, 1, "127.0.0.51", "/", html).await?.0 == 403 {
            in_force_after = Some(switched.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after =
        in_force_after.ok_or_else(|| anyhow::anyhow!("never in force at edge 1\n{}", c.logs()))?;
    assert!(
        after < Duration::from_secs(1),
        "in force at the second edge after {after:?}"
    );

    // curl without a cookie gets the challenge page, not the origin.
    let (status, head, page) = get_from(&c, 1, "127.0.0.52", "/index.html", "").await?;
    assert_eq!(status, 403);
    assert_eq!(header(&head, "cache-control"), Some("no-store, max-age=0"));
    let (token, bits) =
        page_challenge(&page).ok_or_else(|| anyhow::anyhow!("no challenge in:\n{page}"))?;
    assert_eq!(bits, 10);
    // The API route is never challenged.
    assert_eq!(get_from(&c, 1, "127.0.0.52", "/api/time", "").await?.0, 200);
    // A websocket without clearance is refused.
    let ws_head = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(get_from(&c, 1, "127.0.0.52", "/ws", ws_head).await?.0, 403);

    // Solve it at edge 1; the clearance works at edge 0 too.
    let n = solve(&token, bits);
    let (status, head, _) = get_from(
        &c,
        1,
        "127.0.0.52",
        &format!("/.skylane/challenge?t={token}&n={n}&r=%2Findex.html"),
        "",
    )
    .await?;
    assert_eq!(status, 303);
    assert_eq!(header(&head, "location"), Some("/index.html"));
    let set_cookie = header(&head, "set-cookie").unwrap_or_default().to_owned();
    let cookie = set_cookie.split(';').next().unwrap_or_default();
    let with_cookie = format!("Cookie: {cookie}\r\n");
    assert_eq!(
        get_from(&c, 0, "127.0.0.52", "/index.html", &with_cookie)
            .await?
            .0,
        200
    );
    assert_eq!(
        get_from(
            &c,
            0,
            "127.0.0.52",
            "/ws",
            &format!("{ws_head}{with_cookie}")
        )
        .await?
        .0,
        101
    );
    // The cookie is bound to the client's prefix, and a forged or expired one is refused.
    assert_eq!(
        get_from(&c, 0, "127.0.1.52", "/", &with_cookie).await?.0,
        403
    );
    let (exp, tag) = cookie
        .split_once('=')
        .and_then(|(_, v)| v.split_once('.'))
        .unwrap_or_default();
    let forged = format!(
        "Cookie: skylane_clearance={}.{tag}\r\n",
        exp.parse::<u64>().unwrap_or(0) + 1000
    );
    assert_eq!(get_from(&c, 0, "127.0.0.52", "/", &forged).await?.0, 403);
    let expired = "Cookie: skylane_clearance=1000.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n";
    assert_eq!(get_from(&c, 0, "127.0.0.52", "/", expired).await?.0, 403);
    let wrong = get_from(
        &c,
        1,
        "127.0.0.52",
        &format!("/.skylane/challenge?t={token}&n={}", n + 1),
        "",
    )
    .await?;
    assert!(wrong.0 == 403 || wrong.0 == 303, "{}", wrong.0);

    // Off again, everywhere.
    assert_eq!(
        admin_post(
            c.edges[1].admin,
            "/under-attack",
            r#"{"host": "localhost", "on": false}"#
        )
        .await?,
        200
    );
    let off = Instant::now();
    while get_from(&c, 0, "127.0.0.53", "/", html).await?.0 != 200 {
        anyhow::ensure!(
            off.elapsed() < Duration::from_secs(2),
            "never switched off at edge 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bad actions are refused with the reason.
    assert_eq!(
        admin_post(
            c.edges[0].admin,
            "/under-attack",
            r#"{"host": "bad host!", "on": true}"#
        )
        .await?,
        400
    );
    assert_eq!(
        admin_post(c.edges[0].admin, "/under-attack", "nope").await?,
        400
    );
    Ok(())
}

async fn websocket(
    c: &Cluster,
    edge: usize,
    source: &str,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
> {
    let stream = tls_from(c, edge, source, &[b"http/1.1"]).await?;
    let (ws, resp) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws", c.edges[edge].https.port()),
        stream,
    )
    .await?;
    anyhow::ensure!(resp.status() == 101, "status {}", resp.status());
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_pool_grows_past_one_connection_and_overload_gets_503() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let c = Cluster::start(ClusterOptions {
        tunnel_config: "streams_per_connection = 10".into(),
        edge_config: "[limits]\nmax_flows = 30\nmax_flows_per_ip = 25\n".into(),
        ..ClusterOptions::default()
    })?;
    let mut sockets = Vec::new();
    for i in 0..25 {
        let mut ws = websocket(&c, 0, "127.0.0.61").await?;
        ws.send(Message::Text(format!("hello {i}").into())).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), format!("hello {i}")),
            other => anyhow::bail!("websocket {i}: {other:?}\n{}", c.logs()),
        }
        sockets.push(ws);
    }
    let status =
        skylane_tests::status(c.edges[0].admin).ok_or_else(|| anyhow::anyhow!("no status"))?;
    let tunnel = &status["tunnels"][0];
    assert!(tunnel["connections"].as_u64().unwrap_or(0) >= 3, "{tunnel}");
    assert_eq!(tunnel["flows"].as_u64(), Some(25));
    // The client holds its share: its next flow gets 429; another client still gets in.
    assert_eq!(get_from(&c, 0, "127.0.0.61", "/health", "").await?.0, 429);
    let mut more = Vec::new();
    for _ in 0..5 {
        more.push(websocket(&c, 0, "127.0.0.62").await?);
    }
    // Now the edge holds max_flows: 503 with Retry-After for anyone.
    let (status, head, _) = get_from(&c, 0, "127.0.0.63", "/health", "").await?;
    assert_eq!(status, 503);
    assert!(header(&head, "retry-after").is_some());
    // Every websocket still echoes.
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send(Message::Text(format!("again {i}").into())).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), format!("again {i}")),
            other => anyhow::bail!("websocket {i} after overload: {other:?}"),
        }
    }
    drop(more);
    drop(sockets);
    let freed = Instant::now();
    while get_from(&c, 0, "127.0.0.63", "/health", "").await?.0 != 200 {
        anyhow::ensure!(
            freed.elapsed() < Duration::from_secs(5),
            "flows never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_ip_refuse_the_excess_only() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        edge_config: "[limits]\nmax_connections_per_ip = 4\nmax_connections_per_prefix = 100\n"
            .into(),
        ..ClusterOptions::default()
    })?;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tls_from(&c, 0, "127.0.0.71", &[b"http/1.1"]).await?);
    }
    // The fifth from the same address is closed before TLS completes.
    let fifth = tls_from(&c, 0, "127.0.0.71", &[b"http/1.1"]).await;
    assert!(
        fifth.is_err(),
        "the fifth connection from one IP must be refused"
    );
    assert_eq!(get_from(&c, 0, "127.0.0.72", "/health", "").await?.0, 200);
    assert!(
        metric(
            c.edges[0].admin,
            "skylane_edge_connections_refused_total",
            "per_ip"
        ) >= 1.0
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get_from(&c, 0, "127.0.0.71", "/health", "").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_is_pinged_and_an_unanswering_one_closed() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let c = Cluster::start(ClusterOptions {
        edge_config: "[timeouts]\nwebsocket_ping_interval_ms = 300\nwebsocket_idle_ms = 1000\n"
            .into(),
        ..ClusterOptions::default()
    })?;
    // A live client (tungstenite answers pings) stays open well past the idle limit.
    let mut ws = websocket(&c, 0, "127.0.0.81").await?;
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(m))) => anyhow::bail!("unexpected {m:?}"),
            Ok(other) => anyhow::bail!("the live websocket was closed: {other:?}\n{}", c.logs()),
            Err(_) => {}
        }
    }
    assert!(pings >= 2, "pings {pings}");
    ws.send(Message::Text("still here".into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), "still here");
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => anyhow::bail!("{other:?}"),
        }
    }
    // A client that stops reading and answering is closed after the idle limit.
    let raw = tls_from(&c, 0, "127.0.0.82", &[b"http/1.1"]).await?;
    let (mut r, mut w) = tokio::io::split(raw);
    w.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => anyhow::bail!("a silent websocket client was never closed"),
        }
    };
    assert!(
        closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    assert!(
        metric(
            c.edges[0].admin,
            "skylane_edge_websocket_idle_closed_total",
            ""
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_gets_goaway_and_reaches_the_origin_little() -> anyhow::Result<()> {
    use skylane_tests::h2raw::{self, END_HEADERS, END_STREAM, kind};
    let c = Cluster::start(ClusterOptions::default())?;
    let before = metric(c.connector_admin, "skylane_connector_streams_total", "");
    let tls = tls_from(&c, 0, "127.0.0.91", &[b"h2"]).await?;
    let (mut r, mut w) = tokio::io::split(tls);
    let goaway = tokio::spawn(async move { h2raw::read_until_goaway(&mut r).await });
    let mut blast = h2raw::handshake();
    let block = h2raw::get_block("localhost");
    for i in 0..2000u32 {
        let stream = 1 + 2 * i;
        h2raw::frame(
            &mut blast,
            kind::HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &block,
        );
        h2raw::frame(&mut blast, kind::RST_STREAM, 0, stream, &8u32.to_be_bytes());
    }
    let _ = h2raw::send(&mut w, &blast).await;
    let got_goaway = tokio::time::timeout(Duration::from_secs(10), goaway).await??;
    assert!(got_goaway, "a rapid-reset client must get GOAWAY");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = metric(c.connector_admin, "skylane_connector_streams_total", "") - before;
    assert!(
        reached < 500.0,
        "{reached} of 2000 reset requests reached the connector"
    );
    assert_eq!(get_from(&c, 0, "127.0.0.92", "/health", "").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_at_the_header_limit() -> anyhow::Result<()> {
    use skylane_tests::h2raw::{self, END_HEADERS, kind};
    let c = Cluster::start(ClusterOptions::default())?;
    let tls = tls_from(&c, 0, "127.0.0.93", &[b"h2"]).await?;
    let (mut r, mut w) = tokio::io::split(tls);
    let closed = tokio::spawn(async move { h2raw::read_until_goaway(&mut r).await });
    let mut start = h2raw::handshake();
    h2raw::frame(
        &mut start,
        kind::HEADERS,
        0,
        1,
        &h2raw::get_block("localhost"),
    );
    anyhow::ensure!(h2raw::send(&mut w, &start).await, "handshake refused");
    // One header field of ~1 KB per CONTINUATION frame, never ending the block: 4 MB if
    // the edge took them all, against a 64 KiB limit.
    let mut field = vec![0x00, 0x07];
    field.extend_from_slice(b"x-flood");
    field.extend_from_slice(&[0x7f, 0xe9, 0x06]); // value length 1000 (HPACK integer: 127 + 105 + 6·128)
    field.extend(std::iter::repeat_n(b'a', 1000));
    let mut sent = 0usize;
    for _ in 0..4000 {
        let mut f = Vec::new();
        h2raw::frame(&mut f, kind::CONTINUATION, 0, 1, &field);
        if !h2raw::send(&mut w, &f).await {
            break;
        }
        sent += 1;
        if closed.is_finished() {
            break;
        }
    }
    let _ = END_HEADERS;
    let cut = tokio::time::timeout(Duration::from_secs(10), closed).await;
    assert!(
        cut.is_ok(),
        "the edge kept reading CONTINUATION frames ({sent} sent)"
    );
    assert!(sent < 4000, "all {sent} CONTINUATION frames were taken");
    assert_eq!(get_from(&c, 0, "127.0.0.94", "/health", "").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_at_its_flow_cap_gets_503_with_retry_after_not_a_queue() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        web_service_config: "max_concurrent_streams = 2\nqueue_timeout_ms = 200".into(),
        ..ClusterOptions::default()
    })?;
    let a = websocket(&c, 0, "127.0.0.101").await?;
    let b = websocket(&c, 0, "127.0.0.102").await?;
    let started = Instant::now();
    let (status, head, _) = get_from(&c, 0, "127.0.0.103", "/health", "").await?;
    assert_eq!(status, 503, "{head}");
    assert!(header(&head, "retry-after").is_some(), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the excess must not queue long"
    );
    drop((a, b));
    let freed = Instant::now();
    while get_from(&c, 0, "127.0.0.103", "/health", "").await?.0 != 200 {
        anyhow::ensure!(
            freed.elapsed() < Duration::from_secs(5),
            "room never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
