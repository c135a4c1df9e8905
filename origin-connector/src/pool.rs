//! Keep-alive connections to origin servers: HTTP/1.1 on hyper's connection API, with the
//! idle connections of each server kept beside it, most recently used first.
//!
//! A request takes an idle connection to the server's current address when there is one
//! and opens a new one otherwise. Its connection goes back to the server's idle list when
//! the response has been read to the end ([`ServicePool::release`]); one whose response
//! ended early, or became an upgraded pipe, is closed instead. At most
//! `max_idle_per_server` connections wait per server (the oldest is closed first), and
//! none longer than [`IDLE_TIMEOUT`].
//!
//! This is hyper-util's pooled client cut down to what the connector does: one scheme,
//! servers addressed by resolved IP, HTTP/1.1 only. It spares every request that client's
//! pool bookkeeping, its request channel and the task that waits to put a connection back.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::origin::{OriginBody, OriginServer, ServicePool};

/// How long a connection may wait idle for its next request. Origins commonly close idle
/// keep-alive connections after 60–75 s (nginx: 75 s); one closed under a request's feet
/// costs nothing (the request goes on a new connection), but one reused before the origin
/// closes it saves a connect.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to an origin server that carried a request; give it back with
/// [`ServicePool::release`] once the response is read, or drop it to close it.
#[derive(Debug)]
pub struct OriginConn {
    sender: SendRequest<OriginBody>,
    addr: SocketAddr,
    /// The shard whose thread drives it ([`skylane_shared::shards`]): that shard's
    /// requests take it first.
    shard: usize,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened. The request comes back untouched, its body unread,
    /// so the next server may take it.
    #[error("connect: {0}")]
    Connect(std::io::Error, Box<http::Request<OriginBody>>),
    /// The request failed on an open connection.
    #[error(transparent)]
    Request(hyper::Error),
}

/// A server's idle connections, oldest first.
#[derive(Debug, Default)]
pub struct IdleConns(Mutex<Vec<Idle>>);

#[derive(Debug)]
struct Idle {
    conn: OriginConn,
    since: Instant,
}

impl IdleConns {
    /// The most recently used idle connection to `addr` of `shard`'s, else of any shard
    /// (connections to an address the server no longer has, and expired ones, are closed
    /// on the way).
    fn take(&self, addr: SocketAddr, shard: usize) -> Option<OriginConn> {
        let mut closed = Vec::new();
        let found = {
            let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let own = list.iter().rposition(|i| {
                i.conn.shard == shard
                    && i.conn.addr == addr
                    && i.since.elapsed() < IDLE_TIMEOUT
                    && !i.conn.sender.is_closed()
            });
            if let Some(at) = own {
                return Some(list.remove(at).conn);
            }
            loop {
                match list.pop() {
                    None => break None,
                    Some(idle)
                        if idle.conn.addr == addr
                            && idle.since.elapsed() < IDLE_TIMEOUT
                            && !idle.conn.sender.is_closed() =>
                    {
                        break Some(idle.conn);
                    }
                    Some(stale) => closed.push(stale),
                }
            }
        };
        // Closed outside the lock.
        drop(closed);
        found
    }

    /// Keeps `conn` for the next request, within `max` per server.
    fn put(&self, conn: OriginConn, max: usize) {
        if max == 0 || conn.sender.is_closed() {
            return;
        }
        let mut closed = Vec::new();
        {
            let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let expired = list
                .iter()
                .take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT)
                .count();
            closed.extend(list.drain(..expired));
            if list.len() >= max {
                let over = list.len() + 1 - max;
                closed.extend(list.drain(..over));
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        drop(closed);
    }

    /// How many connections wait.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ServicePool {
    /// Sends `req` to `server` at `addr` (its current address): on an idle connection when
    /// one is ready, else on a new one. `req`'s URI is sent as it is (origin-form) and it
    /// must carry a `Host` header.
    pub async fn send(
        &self,
        server: &OriginServer,
        addr: SocketAddr,
        mut req: http::Request<OriginBody>,
    ) -> Result<(http::Response<Incoming>, OriginConn), SendError> {
        let shard = skylane_shared::shards::current();
        while let Some(mut conn) = server.idle.take(addr, shard) {
            // Ready at once unless the connection is still finishing its last response or
            // was closed meanwhile; bounded all the same.
            let ready =
                tokio::time::timeout(self.service.connect_timeout, conn.sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                continue;
            }
            match conn.sender.try_send_request(req).await {
                Ok(response) => return Ok((response, conn)),
                // The origin closed the connection before the request went out: it comes
                // back untouched, for the next connection.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        let stream = match self.dial.tcp(addr, self.service.connect_timeout).await {
            Ok(stream) => stream,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "origin connection ended with an error");
            }
        });
        let response = sender.send_request(req).await.map_err(SendError::Request)?;
        Ok((
            response,
            OriginConn {
                sender,
                addr,
                shard,
            },
        ))
    }

    /// Keeps `conn`, whose response was read to the end, for `server`'s next request.
    pub fn release(&self, server: &OriginServer, conn: OriginConn) {
        server.idle.put(conn, self.service.max_idle_per_server);
    }
}

#[cfg(test)]
mod tests {
    //! Against a small HTTP/1.1 server on loopback that counts the connections it accepts.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::config::{Service, ServiceKind};
    use crate::origin::empty_body;
    use crate::test_origin::next_head;

    /// How the test origin ends a connection.
    #[derive(Clone, Copy, PartialEq)]
    enum Closes {
        /// Never: keep-alive.
        Never,
        /// After the first response, which says `connection: close`.
        Saying,
        /// After the first response, without a word (as when a keep-alive timeout fires).
        Silently,
    }

    /// Answers every request with `200 ok`, closing connections as `closes` says. Returns
    /// its address and its count of accepted connections.
    async fn origin(closes: Closes) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while next_head(&mut tcp, &mut seen).await.is_some() {
                        let reply: &[u8] = if closes == Closes::Saying {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if tcp.write_all(reply).await.is_err() || closes != Closes::Never {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool(addr: SocketAddr, max_idle: usize) -> (ServicePool, Arc<OriginServer>) {
        let pool = ServicePool::new(Service {
            name: "web".into(),
            kind: ServiceKind::Http,
            servers: vec![addr.to_string()],
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            max_idle_per_server: max_idle,
            max_concurrent_streams: 16,
            queue_timeout: Duration::from_secs(1),
            health: None,
        });
        let server = pool.servers[0].clone();
        (pool, server)
    }

    fn get(addr: SocketAddr) -> http::Request<OriginBody> {
        http::Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .body(empty_body())
            .expect("request")
    }

    /// One request, read to the end and released (or not).
    async fn request(pool: &ServicePool, server: &OriginServer, addr: SocketAddr, release: bool) {
        let (response, conn) = pool.send(server, addr, get(addr)).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        if release {
            pool.release(server, conn);
        }
    }

    #[tokio::test]
    async fn a_released_connection_carries_the_next_request() {
        let (addr, accepted) = origin(Closes::Never).await;
        let (pool, server) = pool(addr, 4);
        for _ in 0..5 {
            request(&pool, &server, addr, true).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(server.idle.len(), 1);
        // Not released (a response that ended early): the next request opens another.
        request(&pool, &server, addr, false).await;
        request(&pool, &server, addr, true).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_origin_closed_is_not_reused_and_costs_no_request() {
        for closes in [Closes::Saying, Closes::Silently] {
            let (addr, accepted) = origin(closes).await;
            let (pool, server) = pool(addr, 4);
            for _ in 0..4 {
                request(&pool, &server, addr, true).await;
                // Let the connection's task see the close.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 4);
        }
    }

    #[tokio::test]
    async fn a_request_takes_an_idle_connection_of_its_own_shard_first() {
        let (addr, _) = origin(Closes::Never).await;
        let (pool, server) = pool(addr, 4);
        let mut held = Vec::new();
        for shard in [1, 0] {
            let (response, mut conn) = pool.send(&server, addr, get(addr)).await.expect("response");
            response.into_body().collect().await.expect("body");
            conn.shard = shard;
            held.push(conn);
        }
        for conn in held {
            pool.release(&server, conn);
        }
        // Shard 1's is older, and still the one shard 1 gets; shard 0 gets its own.
        assert_eq!(server.idle.take(addr, 1).map(|c| c.shard), Some(1));
        assert_eq!(server.idle.take(addr, 0).map(|c| c.shard), Some(0));
        // With none of its own, a shard takes another's.
        let (response, conn) = pool.send(&server, addr, get(addr)).await.expect("response");
        response.into_body().collect().await.expect("body");
        pool.release(&server, conn);
        assert!(server.idle.take(addr, 5).is_some());
        assert!(server.idle.is_empty());
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_wait_per_server() {
        let (addr, accepted) = origin(Closes::Never).await;
        let (pool, server) = pool(addr, 2);
        // Five at once: five connections; two stay.
        let mut held = Vec::new();
        for _ in 0..5 {
            let (response, conn) = pool.send(&server, addr, get(addr)).await.expect("response");
            response.into_body().collect().await.expect("body");
            held.push(conn);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        for conn in held {
            pool.release(&server, conn);
        }
        assert_eq!(server.idle.len(), 2);
        // Nothing waits with `max_idle_per_server = 0`.
        let (pool, server) = super::tests::pool(addr, 0);
        request(&pool, &server, addr, true).await;
        assert!(server.idle.is_empty());
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        drop(listener);
        let (pool, server) = pool(addr, 2);
        match pool.send(&server, addr, get(addr)).await {
            Err(SendError::Connect(_, back)) => assert_eq!(back.uri(), "/"),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
