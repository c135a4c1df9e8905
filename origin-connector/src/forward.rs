//! Forwarding one tunnel stream to an origin service.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt as _;
use skylane_shared::flow::{FlowRecv, FlowSend};
use skylane_shared::pipe::{TunnelBody, head_and_body_to_stream, splice};
use skylane_shared::resolve::Resolver;
use skylane_shared::wire::{
    self, Refusal, RefusalKind, Reply, RequestHead, ResponseHead, StreamKind,
};
use tracing::Instrument as _;

use crate::config::ServiceKind;
use crate::origin::{OriginServer, ServicePool, empty_body};
use crate::pool::{OriginConn, SendError};
use crate::stream_metrics::{self, StreamMetrics};

/// What a stream handler needs.
#[derive(Clone, Debug)]
pub struct Context {
    /// Services by name.
    pub services: Arc<dyn ServiceLookup>,
    /// Resolves origin names.
    pub resolver: Resolver,
    /// Set while draining: new streams are refused so edges use another connector.
    pub draining: tokio_util::sync::CancellationToken,
    /// Set (before `draining`) when the drain is a hand-over to a successor process: the
    /// refusal then tells edges to open a new tunnel connection to this same connector.
    pub restarting: Arc<std::sync::atomic::AtomicBool>,
    /// Where upgraded pipes run once their handshake is done (the tracker the drain waits
    /// for): a pipe gets a small task of its own, and the large state of the request that
    /// opened it is freed, which matters with tens of thousands of idle websockets.
    pub pipes: tokio_util::task::TaskTracker,
}

/// Where a stream's service is looked up: the connector's services in force (they change
/// on reload), or a fixed set (an edge's services behind WireGuard).
pub trait ServiceLookup: Send + Sync + std::fmt::Debug {
    /// The service named `name`, if there is one.
    fn get(&self, name: &str) -> Option<Arc<ServicePool>>;
}

impl ServiceLookup for crate::reload::Services {
    fn get(&self, name: &str) -> Option<Arc<ServicePool>> {
        crate::reload::Services::get(self, name)
    }
}

impl ServiceLookup for std::collections::BTreeMap<String, Arc<ServicePool>> {
    fn get(&self, name: &str) -> Option<Arc<ServicePool>> {
        std::collections::BTreeMap::get(self, name).cloned()
    }
}

/// How long an edge may take to send the stream header.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Handles one stream from an edge, start to finish.
pub async fn handle_stream(ctx: Context, peer: Arc<str>, mut send: FlowSend, mut recv: FlowRecv) {
    let started = Instant::now();
    let header = match tokio::time::timeout(HEADER_TIMEOUT, wire::read_header(&mut recv)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            metrics::counter!("skylane_connector_bad_streams_total").increment(1);
            tracing::warn!(%peer, error = %e, "malformed stream header");
            refuse(&mut send, RefusalKind::BadHeader, e.to_string()).await;
            recv.stop();
            return;
        }
        Err(_) => {
            metrics::counter!("skylane_connector_bad_streams_total").increment(1);
            tracing::debug!(%peer, "no stream header in time");
            recv.stop();
            send.reset();
            return;
        }
    };
    let span = tracing::debug_span!("stream", %peer, service = %header.service, request_id = %header.request_id);
    // `.instrument`, not `span.enter()`: a guard held across an await would put this
    // stream's span on whatever else the thread runs meanwhile.
    // Boxed: a task is copied whole when it is spawned and again when it ends, and the
    // rest of the stream's work is most of its size: 5,744 bytes unboxed, 1,392 boxed
    // (rustc 1.95, `-Zprint-type-sizes`).
    Box::pin(serve_stream(ctx, peer, header, send, recv, started).instrument(span)).await;
}

async fn serve_stream(
    ctx: Context,
    peer: Arc<str>,
    header: wire::StreamHeader,
    mut send: FlowSend,
    mut recv: FlowRecv,
    started: Instant,
) {
    if ctx.draining.is_cancelled() {
        let (kind, message) = if ctx.restarting.load(std::sync::atomic::Ordering::Relaxed) {
            (
                RefusalKind::Restarting,
                "connector process is handing over to its successor",
            )
        } else {
            (RefusalKind::Draining, "connector is draining")
        };
        refuse(&mut send, kind, message.into()).await;
        return;
    }
    let Some(pool) = ctx.services.get(&header.service) else {
        tracing::warn!(%peer, service = %header.service, "stream names an unknown service");
        refuse(
            &mut send,
            RefusalKind::UnknownService,
            format!("no service named {:?}", header.service),
        )
        .await;
        recv.stop();
        return;
    };
    match (&header.kind, pool.service.kind) {
        (StreamKind::Http(_), ServiceKind::Http) | (StreamKind::Tcp, ServiceKind::Tcp) => {}
        _ => {
            refuse(
                &mut send,
                RefusalKind::BadHeader,
                format!(
                    "service {:?} does not take this kind of stream",
                    header.service
                ),
            )
            .await;
            return;
        }
    };
    // Room at the origin: a flow past the service's cap waits a little, then is refused
    // as overloaded (a bounded queue, never an unbounded one).
    let room = tokio::time::timeout(
        pool.service.queue_timeout,
        pool.room.clone().acquire_owned(),
    );
    let Ok(Ok(room)) = room.await else {
        tracing::warn!(%peer, service = %pool.service.name, "service at its flow cap; refusing");
        refuse(
            &mut send,
            RefusalKind::Overloaded,
            format!(
                "service {:?} carries its maximum of flows",
                pool.service.name
            ),
        )
        .await;
        recv.stop();
        return;
    };
    let metrics = pool.metrics();
    metrics.stream_started();
    let piped = match header.kind {
        StreamKind::Http(head) => {
            let home = PipeHome {
                pipes: &ctx.pipes,
                metrics: metrics.clone(),
                started,
                room,
            };
            forward_http(&ctx, &pool, head, send, recv, home).await
        }
        StreamKind::Tcp => {
            forward_tcp(&ctx, &pool, send, recv).await;
            drop(room);
            false
        }
    };
    // A pipe records its own end.
    if !piped {
        metrics.stream_ended(started.elapsed());
    }
}

/// The service's healthy servers, or `None` after a `NoHealthyOrigin` refusal was sent to
/// the edge.
async fn healthy_candidates(
    pool: &ServicePool,
    send: &mut FlowSend,
) -> Option<Vec<std::sync::Arc<OriginServer>>> {
    let candidates = pool.candidates();
    if candidates.is_empty() {
        let message = format!(
            "service {:?} has no healthy origin server",
            pool.service.name
        );
        refuse(send, RefusalKind::NoHealthyOrigin, message).await;
        return None;
    }
    Some(candidates)
}

async fn refuse(send: &mut FlowSend, kind: RefusalKind, message: String) {
    crate::stream_metrics::stream_refused(kind.label());
    let _ = wire::write_frame(send, &Reply::Refused(Refusal { kind, message })).await;
    let _ = send.finish().await;
}

/// The origin request for `head`: its method, its path as the URI (origin-form) and its
/// headers, taken out of `head`. The flag says whether the edge sent a `Host`; when it did
/// not, each server is named by its own address ([`name_host`]).
fn origin_request(
    head: &mut RequestHead,
    body: crate::origin::OriginBody,
) -> Result<(http::Request<crate::origin::OriginBody>, bool), String> {
    let uri = http::Uri::try_from(head.path.as_str())
        .map_err(|e| format!("bad path {:?}: {e}", head.path))?;
    if uri.scheme().is_some() || uri.path_and_query().is_none() {
        return Err(format!("bad path {:?}: not origin-form", head.path));
    }
    let method =
        http::Method::from_bytes(head.method.as_bytes()).map_err(|e| format!("bad method: {e}"))?;
    let mut req = http::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = std::mem::take(&mut head.headers.0);
    let has_host = req.headers().contains_key(http::header::HOST);
    Ok((req, has_host))
}

/// Names `addr` in `req`'s `Host`, for a request whose edge sent none.
fn name_host(req: &mut http::Request<crate::origin::OriginBody>, addr: std::net::SocketAddr) {
    if let Ok(host) = http::HeaderValue::from_str(&addr.to_string()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
}

/// Forwards one HTTP request; true when it became an upgraded pipe (running on its own).
async fn forward_http(
    ctx: &Context,
    pool: &ServicePool,
    mut head: RequestHead,
    mut send: FlowSend,
    recv: FlowRecv,
    home: PipeHome<'_>,
) -> bool {
    let Some(candidates) = healthy_candidates(pool, &mut send).await else {
        return false;
    };
    // One request, built once: when a server can't be connected to, the request comes back
    // with its body unread (`SendError::Connect`) and goes to the next server. Once it is
    // on a connection it is not tried again, as its body may have started streaming.
    let (body, recv) = if head.has_body {
        (TunnelBody::new(recv, None).boxed_unsync(), None)
    } else {
        (empty_body(), Some(recv))
    };
    let (mut req, edge_named_host) = match origin_request(&mut head, body) {
        Ok(r) => r,
        Err(message) => {
            refuse(&mut send, RefusalKind::BadHeader, message).await;
            return false;
        }
    };
    let mut last_error = String::new();
    for server in candidates {
        // Boxed: the resolver's future is large, and an unboxed one would make every
        // stream's task as large, for as long as the stream lives.
        let addr = match Box::pin(server.addr(&ctx.resolver)).await {
            Ok(a) => a,
            Err(e) => {
                last_error = e.to_string();
                pool.record_failure(&server);
                continue;
            }
        };
        if !edge_named_host {
            name_host(&mut req, addr);
        }
        let sent =
            tokio::time::timeout(pool.service.response_timeout, pool.send(&server, addr, req));
        let (response, conn) = match sent.await {
            Err(_) => {
                tracing::warn!(server = %server.spec, "origin did not answer in time");
                refuse(
                    &mut send,
                    RefusalKind::OriginTimeout,
                    format!(
                        "origin did not answer within {} ms",
                        pool.service.response_timeout.as_millis()
                    ),
                )
                .await;
                return false;
            }
            Ok(Err(SendError::Connect(e, back))) => {
                req = *back;
                last_error = error_chain(&e);
                pool.record_failure(&server);
                tracing::warn!(server = %server.spec, error = %last_error, "could not connect to origin");
                continue;
            }
            Ok(Err(SendError::Request(e))) => {
                // hyper's message may be short ("connection error"): the cause is in the
                // sources.
                last_error = error_chain(&e);
                tracing::warn!(server = %server.spec, error = %last_error, "origin request failed");
                break;
            }
            Ok(Ok(r)) => r,
        };
        let origin = Origin {
            pool,
            server: &server,
            conn,
        };
        return relay_response(origin, &head, response, send, recv, home).await;
    }
    refuse(
        &mut send,
        RefusalKind::OriginUnreachable,
        format!("no origin server answered: {last_error}"),
    )
    .await;
    false
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The server that answered, and the connection it answered on (kept for the next request
/// once the response is read to the end).
struct Origin<'a> {
    pool: &'a ServicePool,
    server: &'a OriginServer,
    conn: OriginConn,
}

/// Where an upgraded pipe runs, and what it records when it ends.
struct PipeHome<'a> {
    pipes: &'a tokio_util::task::TaskTracker,
    metrics: StreamMetrics,
    started: Instant,
    /// The flow's room at the origin: a pipe holds it as long as it lives.
    room: tokio::sync::OwnedSemaphorePermit,
}

async fn relay_response(
    origin: Origin<'_>,
    head: &RequestHead,
    mut response: http::Response<hyper::body::Incoming>,
    mut send: FlowSend,
    recv: Option<FlowRecv>,
    home: PipeHome<'_>,
) -> bool {
    let PipeHome {
        pipes,
        metrics,
        started,
        room,
    } = home;
    let server = origin.server;
    let status = response.status();
    let reply = Reply::Response(ResponseHead {
        status: status.as_u16(),
        headers: std::mem::take(response.headers_mut()).into(),
    });
    let reply = match wire::encode_frame(&reply) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(server = %server.spec, error = %e, "origin response head not forwarded");
            refuse(&mut send, RefusalKind::BadHeader, e.to_string()).await;
            return false;
        }
    };
    if head.upgrade && status == http::StatusCode::SWITCHING_PROTOCOLS {
        if send.write_chunk(reply).await.is_err() {
            return false; // the edge went away
        }
        let Some(recv) = recv else {
            return false;
        };
        let upgraded = hyper::upgrade::on(&mut response).await;
        // The connection is the pipe's now, never the pool's.
        drop(origin.conn);
        return match upgraded {
            Ok(upgraded) => {
                drop(response);
                pipes.spawn(async move {
                    let _room = room;
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    match splice(recv, send, io).await {
                        Ok((up, down)) => {
                            stream_metrics::bytes().to_origin.increment(up);
                            stream_metrics::bytes().from_origin.increment(down);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "upgraded connection ended with an error")
                        }
                    }
                    metrics.stream_ended(started.elapsed());
                }.in_current_span());
                true
            }
            Err(e) => {
                tracing::warn!(server = %server.spec, error = %e, "origin upgrade failed");
                send.reset();
                false
            }
        };
    }
    let sent = head_and_body_to_stream(reply, response.into_body(), &mut send).await;
    if let Some(mut recv) = recv {
        // A bodiless request: its end came right after the header.
        recv.end_if_there();
    }
    match sent {
        Ok(n) => {
            stream_metrics::bytes().from_origin.increment(n);
            origin.pool.release(server, origin.conn);
        }
        Err(e) => {
            tracing::debug!(error = %e, "response body ended early");
            send.reset();
        }
    }
    false
}

async fn forward_tcp(ctx: &Context, pool: &ServicePool, mut send: FlowSend, recv: FlowRecv) {
    let Some(candidates) = healthy_candidates(pool, &mut send).await else {
        return;
    };
    for server in candidates {
        let Ok(addr) = Box::pin(server.addr(&ctx.resolver)).await else {
            pool.record_failure(&server);
            continue;
        };
        match pool.dial.tcp(addr, pool.service.connect_timeout).await {
            Ok(tcp) => {
                if wire::write_frame(&mut send, &Reply::Connected)
                    .await
                    .is_err()
                {
                    return;
                }
                if let Err(e) = splice(recv, send, tcp).await {
                    tracing::debug!(error = %e, "tcp flow ended with an error");
                }
                return;
            }
            Err(_) => pool.record_failure(&server),
        }
    }
    refuse(
        &mut send,
        RefusalKind::OriginUnreachable,
        "no origin server accepted the connection".into(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    //! A stream from an "edge" (an in-process pipe) through `handle_stream` to origin
    //! servers on loopback.
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use skylane_shared::flow::from_pipe;
    use skylane_shared::wire::{StreamHeader, WIRE_VERSION, WireHeaders};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::config::Service;
    use crate::test_origin::{fill, next_head};

    /// An origin that answers every request with its body, then closes the connection.
    async fn echo_origin() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let Some(head) = next_head(&mut tcp, &mut seen).await else {
                        return;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if !fill(&mut tcp, &mut seen, len).await {
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                    );
                    let _ = tcp.write_all(reply.as_bytes()).await;
                    let _ = tcp.write_all(&seen[..len]).await;
                });
            }
        });
        addr
    }

    /// An address nothing listens on: connecting to it is refused.
    fn refusing_addr() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    }

    fn context(servers: Vec<String>) -> Context {
        let pool = ServicePool::new(Service {
            name: "web".into(),
            kind: ServiceKind::Http,
            servers,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            max_idle_per_server: 4,
            max_concurrent_streams: 16,
            queue_timeout: Duration::from_secs(1),
            health: None,
        });
        let services: BTreeMap<String, Arc<ServicePool>> =
            [("web".to_string(), Arc::new(pool))].into();
        Context {
            services: Arc::new(services),
            resolver: Resolver::from_system(),
            draining: tokio_util::sync::CancellationToken::new(),
            restarting: Arc::default(),
            pipes: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Sends a POST of `body` to the `web` service through `ctx`; returns the reply and
    /// the bytes that followed it.
    async fn post(ctx: Context, body: &[u8]) -> (Reply, Vec<u8>) {
        let (edge, connector) = tokio::io::duplex(64 * 1024);
        let (send, recv) = from_pipe(connector);
        tokio::spawn(handle_stream(ctx, "edge".into(), send, recv));
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, "example.com".parse().expect("value"));
        headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        let header = StreamHeader {
            version: WIRE_VERSION,
            service: "web".into(),
            client_addr: None,
            request_id: "test".into(),
            kind: StreamKind::Http(RequestHead {
                method: "POST".into(),
                path: "/echo".into(),
                headers: WireHeaders(headers),
                upgrade: false,
                has_body: true,
            }),
        };
        let (mut from_connector, mut to_connector) = tokio::io::split(edge);
        wire::write_frame(&mut to_connector, &header)
            .await
            .expect("header");
        to_connector.write_all(body).await.expect("body");
        to_connector.shutdown().await.expect("end of the request");
        let reply: Reply = wire::read_frame(&mut from_connector).await.expect("reply");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            from_connector.read_to_end(&mut rest),
        )
        .await;
        (reply, rest)
    }

    #[tokio::test]
    async fn a_request_with_a_body_moves_on_when_a_server_refuses_the_connection() {
        let live = echo_origin().await;
        // Round-robin starts at the first server: the refusing one is tried first.
        let ctx = context(vec![refusing_addr().to_string(), live.to_string()]);
        let (reply, body) = post(ctx, b"hello, origin").await;
        match reply {
            Reply::Response(head) => assert_eq!(head.status, 200),
            other => panic!("expected a response, got {other:?}"),
        }
        assert_eq!(body, b"hello, origin");
    }

    #[tokio::test]
    async fn when_no_server_takes_the_connection_the_edge_hears_why() {
        let ctx = context(vec![
            refusing_addr().to_string(),
            refusing_addr().to_string(),
        ]);
        let (reply, _) = post(ctx, b"hello").await;
        match reply {
            Reply::Refused(r) => assert_eq!(r.kind, RefusalKind::OriginUnreachable),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
