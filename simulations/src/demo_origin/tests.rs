//! In-process tests: the real server on 127.0.0.1:0, driven by hyper and
//! tokio-tungstenite clients over real sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, connect_async_with_config};
use tokio_util::sync::CancellationToken;

use super::pattern::pattern_byte;
use super::{BoxError, OriginConfig, ResBody, serve};

/// A server running in this test's runtime.
struct Origin {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Origin {
    async fn start(config: OriginConfig) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, config, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    async fn named(name: &str) -> Result<Self> {
        Self::start(OriginConfig::new(name, None)?).await
    }

    /// Send one request on a fresh HTTP/1.1 connection.
    async fn h1(&self, req: Request<ResBody>) -> Result<Response<Incoming>> {
        let stream = TcpStream::connect(self.addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender.send_request(req).await?)
    }

    async fn get(&self, path: &str) -> Result<Response<Incoming>> {
        self.h1(Request::get(path)
            .header(header::HOST, "origin")
            .body(empty())?)
            .await
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .context("serve did not return after shutdown")??;
        Ok(())
    }
}

fn empty() -> ResBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

async fn body_bytes(res: Response<Incoming>) -> Result<Bytes> {
    Ok(res.into_body().collect().await?.to_bytes())
}

fn large_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

#[tokio::test]
async fn http1_endpoints() -> Result<()> {
    let origin = Origin::named("east-1").await?;

    let res = origin.get("/health").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-origin-name"], "east-1");
    assert_eq!(body_bytes(res).await?, "ok");

    let res = origin.get("/bytes/1000").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_LENGTH], "1000");
    let body = body_bytes(res).await?;
    let expected: Vec<u8> = (0..1000).map(pattern_byte).collect();
    assert_eq!(body, expected);

    let res = origin.get("/bytes/not-a-number").await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    let res = origin.get("/").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(String::from_utf8(body_bytes(res).await?.to_vec())?.contains("/static/app.js"));

    let res = origin.get("/static/app.js").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "public, max-age=60");
    assert!(String::from_utf8(body_bytes(res).await?.to_vec())?.contains("/ws"));

    let res = origin.get("/api/time").await?;
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let time: serde_json::Value = serde_json::from_slice(&body_bytes(res).await?)?;
    assert_eq!(time["origin"], "east-1");
    assert!(time["unix_ms"].as_u64().is_some());

    let start = Instant::now();
    let res = origin.get("/delay/150").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));

    let res = origin.get("/nope").await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()["x-origin-name"], "east-1");

    // A plain GET of /ws is not a handshake.
    let res = origin.get("/ws").await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    origin.stop().await
}

#[tokio::test]
async fn health_follows_the_fail_file() -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "demo-origin-health-{}-{}",
        std::process::id(),
        super::unix_ms()
    ));
    let origin = Origin::start(OriginConfig::new("o", Some(path.clone()))?).await?;
    assert_eq!(origin.get("/health").await?.status(), StatusCode::OK);
    std::fs::write(&path, b"")?;
    assert_eq!(
        origin.get("/health").await?.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    std::fs::remove_file(&path)?;
    assert_eq!(origin.get("/health").await?.status(), StatusCode::OK);
    origin.stop().await
}

/// The echo must answer while the request is still being sent: the first
/// chunk comes back before the second is written.
#[tokio::test]
async fn echo_streams_while_the_request_is_in_flight() -> Result<()> {
    let origin = Origin::named("o").await?;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, BoxError>(Frame::data(chunk)), rx))
    });
    let req = Request::post("/echo")
        .header(header::HOST, "origin")
        .header(header::CONTENT_TYPE, "application/x-test")
        .body(StreamBody::new(chunks).boxed_unsync())?;

    let chunk = Bytes::from(vec![0xa5; 64 * 1024]);
    tx.send(chunk.clone()).await?;
    let res = origin.h1(req).await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/x-test");
    let mut body = res.into_body();

    let mut echoed = 0usize;
    let mut sent = chunk.len();
    while echoed < chunk.len() {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .context("first chunk was not echoed before the request finished")?;
        match frame {
            Some(frame) => echoed += frame?.into_data().map(|d| d.len()).unwrap_or(0),
            None => bail!("echo ended early"),
        }
    }
    // Then 8 MB more, streamed through.
    for i in 0..128u8 {
        tx.send(Bytes::from(vec![i; 64 * 1024])).await?;
        sent += 64 * 1024;
    }
    drop(tx);
    let rest = body.collect().await?.to_bytes();
    assert_eq!(echoed + rest.len(), sent);
    assert!(rest[..64 * 1024].iter().all(|&b| b == 0));
    origin.stop().await
}

#[tokio::test]
async fn sse_sends_twenty_events_100ms_apart() -> Result<()> {
    let origin = Origin::named("o").await?;
    let start = Instant::now();
    let res = origin.get("/sse").await?;
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = res.into_body();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            text.push_str(std::str::from_utf8(&data)?);
            arrivals.push(start.elapsed());
        }
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 20);
    for (seq, event) in events.iter().enumerate() {
        let mut lines = event.lines();
        assert_eq!(lines.next(), Some(format!("id: {seq}").as_str()));
        let ts = lines.next().and_then(|l| l.strip_prefix("data: "));
        assert!(
            ts.and_then(|t| t.parse::<u64>().ok()).is_some(),
            "{event:?}"
        );
    }
    // Each event is flushed on its own, not buffered until the end.
    assert!(
        arrivals.len() >= 15,
        "events arrived in {} writes",
        arrivals.len()
    );
    let first = arrivals.first().copied().unwrap_or_default();
    let last = arrivals.last().copied().unwrap_or_default();
    assert!(
        first < Duration::from_millis(500),
        "first event at {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(1800) && last - first < Duration::from_secs(4),
        "events spanned {:?}",
        last - first
    );
    origin.stop().await
}

#[tokio::test]
async fn websocket_echo_ping_and_close_code() -> Result<()> {
    let origin = Origin::named("ws-origin").await?;
    let (mut ws, res) =
        connect_async_with_config(origin.ws_url(), Some(large_ws_config()), false).await?;
    assert_eq!(res.headers()["x-origin-name"], "ws-origin");

    ws.send(Message::text("hello")).await?;
    assert_eq!(ws.next().await.context("closed")??, Message::text("hello"));

    // Bigger than tungstenite's default 16 MiB frame limit.
    let big = Bytes::from((0..17 * 1024 * 1024).map(pattern_byte).collect::<Vec<u8>>());
    ws.send(Message::Binary(big.clone())).await?;
    assert_eq!(ws.next().await.context("closed")??, Message::Binary(big));

    ws.send(Message::Ping(Bytes::from_static(b"p"))).await?;
    assert_eq!(
        ws.next().await.context("closed")??,
        Message::Pong(Bytes::from_static(b"p"))
    );

    // Unusable close commands are echoed like any text.
    ws.send(Message::text("close:1006:nope")).await?;
    assert_eq!(
        ws.next().await.context("closed")??,
        Message::text("close:1006:nope")
    );

    ws.send(Message::text("close:4001:bye: now")).await?;
    match ws.next().await.context("closed")?? {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::from(4001));
            assert_eq!(frame.reason.as_str(), "bye: now");
        }
        other => bail!("expected a close frame, got {other:?}"),
    }
    // tungstenite answers the close; then the server ends the connection.
    assert!(matches!(
        ws.next().await,
        None | Some(Err(tungstenite::Error::ConnectionClosed))
    ));
    origin.stop().await
}

#[tokio::test]
async fn h2c_requests_and_extended_connect_websocket() -> Result<()> {
    let origin = Origin::named("h2").await?;
    let stream = TcpStream::connect(origin.addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);

    let uri = format!("http://{}", origin.addr);
    let res = sender
        .send_request(Request::get(format!("{uri}/bytes/200000")).body(empty())?)
        .await?;
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.headers()["x-origin-name"], "h2");
    let body = body_bytes(res).await?;
    assert_eq!(body.len(), 200_000);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64))
    );

    let res = sender
        .send_request(
            Request::post(format!("{uri}/echo")).body(
                Full::new(Bytes::from_static(b"abc"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )?,
        )
        .await?;
    assert_eq!(body_bytes(res).await?, "abc");

    // RFC 8441: the server enabled extended CONNECT in its settings, which
    // arrived before the responses above.
    let mut req = Request::connect(format!("{uri}/ws"))
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .body(empty())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut res = sender.send_request(req).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(&mut res).await?;
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    ws.send(Message::text("over h2")).await?;
    assert_eq!(
        ws.next().await.context("closed")??,
        Message::text("over h2")
    );
    ws.close(None).await?;
    origin.stop().await
}

#[tokio::test]
async fn shutdown_closes_websockets_with_going_away() -> Result<()> {
    let origin = Origin::named("o").await?;
    let (mut ws, _) = connect_async_with_config(origin.ws_url(), None, false).await?;
    ws.send(Message::text("hi")).await?;
    assert_eq!(ws.next().await.context("closed")??, Message::text("hi"));

    origin.shutdown.cancel();
    match ws.next().await.context("closed")?? {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => bail!("expected a close frame, got {other:?}"),
    }
    // Let tungstenite send the close reply so the server's echo task ends.
    while ws.next().await.is_some() {}
    tokio::time::timeout(Duration::from_secs(5), origin.task)
        .await
        .context("serve did not return after shutdown")??;
    Ok(())
}
