//! How tunnel streams end, over real quinn connections between two mesh sockets.
//!
//! quinn sends STOP_SENDING when a receive stream is dropped before its end was read, even
//! when the end had arrived. A proxy that did that on every request would send a spurious
//! frame, often a packet, each way per request. These tests read the frame counters of the
//! sending side to check that the body and the connector helpers take the end with them.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use skylane_shared::flow::{self, FlowRecv};
use skylane_shared::pipe::{TunnelBody, head_and_body_to_stream};
use tokio::io::AsyncReadExt as _;

/// Bounds every wait, so a hang fails instead of blocking the machine.
const LIMIT: Duration = Duration::from_secs(20);

mod support;

/// A connected pair: (edge side, connector side).
async fn pair() -> anyhow::Result<(quinn::Connection, quinn::Connection)> {
    let nodes = support::mesh(&["edge", "connector"]).await?;
    let server = nodes[1].endpoint.clone();
    let accept = tokio::spawn(async move {
        let incoming = server.accept().await.context("no incoming connection")?;
        anyhow::Ok(incoming.await?)
    });
    let edge = nodes[0].connect(&nodes[1]).await?;
    let connector = accept.await??;
    Ok((edge, connector))
}

/// STOP_SENDING frames `conn` has received so far.
fn stop_sending_received(conn: &quinn::Connection) -> u64 {
    conn.stats().frame_rx.stop_sending
}

/// Waits until the peer had time to send anything it was going to (ACKs travel both ways).
async fn settle(a: &quinn::Connection) {
    let start = a.stats().frame_rx.acks;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if a.stats().frame_rx.acks > start + 1 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The edge side of a request: the connector answers with a head, a ready body and the
/// end in one write; the edge reads the body as hyper does for a `Content-Length`
/// response (it stops asking once the bytes are in) and drops it. The connector must get
/// no STOP_SENDING, and the edge must see head, body and end.
#[tokio::test]
async fn a_content_length_body_read_to_its_length_sends_no_stop_sending() -> anyhow::Result<()> {
    let (edge, connector) = tokio::time::timeout(LIMIT, pair()).await??;
    for round in 0..20u8 {
        let (mut req_send, mut resp_recv) = edge.open_bi().await?;
        req_send.write_all(b"GET").await?;
        req_send.finish()?;
        let (mut resp_send, mut req_recv) =
            flow::from_quic(tokio::time::timeout(LIMIT, connector.accept_bi()).await??);
        let mut request = [0u8; 3];
        req_recv.read_exact(&mut request).await?;
        let body = http_body_util::Full::new(Bytes::from(vec![round; 100]));
        let sent =
            head_and_body_to_stream(Bytes::from_static(b"HEAD"), body, &mut resp_send).await?;
        assert_eq!(sent, 100);
        // The request's end came with its bytes: the connector takes it, as it does after
        // answering a bodiless request.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(req_recv.end_if_there(), "the request's end had arrived");
        drop(req_recv);

        let mut head = [0u8; 4];
        tokio::time::timeout(LIMIT, resp_recv.read_exact(&mut head)).await??;
        assert_eq!(&head, b"HEAD");
        let mut body = TunnelBody::new(FlowRecv::Quic(resp_recv), Some(100));
        let mut got = Vec::new();
        // Like hyper: read frames until the announced length is in, then stop.
        while got.len() < 100 {
            let frame = tokio::time::timeout(LIMIT, body.frame())
                .await?
                .context("body ended early")??;
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, vec![round; 100]);
        assert!(hyper::body::Body::is_end_stream(&body));
        drop(body);
    }
    settle(&edge).await;
    settle(&connector).await;
    assert_eq!(
        stop_sending_received(&connector),
        0,
        "the edge sent STOP_SENDING for responses it had read to the end"
    );
    assert_eq!(
        stop_sending_received(&edge),
        0,
        "the connector sent STOP_SENDING for requests whose end had arrived"
    );
    Ok(())
}

/// A stream dropped before its data was read still tells the peer to stop: the helpers
/// only skip the frame when there is nothing left to stop.
#[tokio::test]
async fn an_unread_stream_still_sends_stop_sending() -> anyhow::Result<()> {
    let (edge, connector) = tokio::time::timeout(LIMIT, pair()).await??;
    let (mut req_send, _resp_recv) = edge.open_bi().await?;
    req_send.write_all(&[1u8; 1000]).await?;
    let (_resp_send, mut req_recv) = tokio::time::timeout(LIMIT, connector.accept_bi()).await??;
    let mut first = [0u8; 10];
    req_recv.read_exact(&mut first).await?;
    // Data is left and the end never came: nothing to take.
    let mut req_recv = FlowRecv::Quic(req_recv);
    assert!(!req_recv.end_if_there());
    drop(req_recv);
    settle(&connector).await;
    settle(&edge).await;
    assert_eq!(stop_sending_received(&edge), 1);
    Ok(())
}
