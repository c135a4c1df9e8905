//! The emulated users: real TCP, real TLS 1.3 (rustls), real HTTP and websockets, timed
//! from the first SYN to the last byte that matters. Each call opens a new connection,
//! like a user arriving for the first time (no TLS resumption, no connection reuse).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

use super::RealnetError;

/// Longest any single measurement may take before it counts as failed.
pub const MEASUREMENT_TIMEOUT: Duration = Duration::from_secs(20);

/// TLS settings of the emulated users: they trust the dev CA and ask for `localhost`.
#[derive(Clone)]
pub struct Users {
    h1: TlsConnector,
    h2: TlsConnector,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Users")
    }
}

fn client_error(what: &str, e: impl std::fmt::Display) -> RealnetError {
    RealnetError::Client(format!("{what}: {e}"))
}

impl Users {
    /// Users trusting the CA in `ca_pem`.
    pub fn new(ca_pem: &Path) -> Result<Users, RealnetError> {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca_pem)
            .map_err(|e| client_error("reading the dev CA", e))?;
        for cert in certs {
            roots
                .add(cert.map_err(|e| client_error("parsing the dev CA", e))?)
                .map_err(|e| client_error("adding the dev CA", e))?;
        }
        let config = |alpn: &[u8]| -> Result<TlsConnector, RealnetError> {
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| client_error("TLS versions", e))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            // A first visit: no session tickets to resume from.
            c.resumption = rustls::client::Resumption::disabled();
            Ok(TlsConnector::from(Arc::new(c)))
        };
        Ok(Users {
            h1: config(b"http/1.1")?,
            h2: config(b"h2")?,
        })
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, RealnetError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| client_error("TCP connect", e))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from("localhost")
            .map_err(|e| client_error("server name", e))?;
        let connector = if h2 { &self.h2 } else { &self.h1 };
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| client_error("TLS handshake", e))
    }

    /// New connection, websocket upgrade on `/ws`, one message and its echo.
    pub async fn websocket_first_message(
        &self,
        addr: SocketAddr,
    ) -> Result<Duration, RealnetError> {
        let start = Instant::now();
        let (mut ws, _) = self.open_websocket(addr).await?;
        let msg = Message::Text("hello from a new user".into());
        ws.send(msg.clone())
            .await
            .map_err(|e| client_error("websocket send", e))?;
        loop {
            match ws.next().await {
                Some(Ok(m)) if m == msg => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(client_error("websocket echo", format!("{other:?}")));
                }
                Some(Err(e)) => return Err(client_error("websocket echo", e)),
                None => return Err(client_error("websocket echo", "closed")),
            }
        }
        let took = start.elapsed();
        let _ = ws.close(None).await;
        Ok(took)
    }

    /// New connection and websocket on `/ws` (for chat sessions).
    pub async fn open_websocket(
        &self,
        addr: SocketAddr,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
            Duration,
        ),
        RealnetError,
    > {
        let start = Instant::now();
        let tls = self.connect(addr, false).await?;
        let (ws, _) =
            tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", addr.port()), tls)
                .await
                .map_err(|e| client_error("websocket upgrade", e))?;
        Ok((ws, start.elapsed()))
    }

    /// New connection, `GET /api/time` over HTTP/1.1, time to the first response byte.
    pub async fn dynamic_ttfb(&self, addr: SocketAddr) -> Result<Duration, RealnetError> {
        let start = Instant::now();
        let mut tls = self.connect(addr, false).await?;
        tls.write_all(b"GET /api/time HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| client_error("sending the request", e))?;
        let mut first = [0u8; 1];
        let n = tls
            .read(&mut first)
            .await
            .map_err(|e| client_error("reading the response", e))?;
        let took = start.elapsed();
        if n == 0 || first[0] != b'H' {
            return Err(client_error("reading the response", "no HTTP response"));
        }
        // Read the rest so the server is not cut off mid-write.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
        Ok(took)
    }

    /// New connection over HTTP/2, `GET /`, then every `/static/…` asset the page names,
    /// fetched in parallel on the same connection, as a browser would; time until the last
    /// byte of the last asset, and how many requests that took.
    pub async fn page_load(&self, addr: SocketAddr) -> Result<(Duration, u64), RealnetError> {
        let start = Instant::now();
        let tls = self.connect(addr, true).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| client_error("HTTP/2 handshake", e))?;
        let conn = tokio::spawn(conn);
        let get = |path: String| {
            let mut sender = sender.clone();
            async move {
                let req = http::Request::get(format!("https://localhost:{}{path}", addr.port()))
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| client_error("building a request", e))?;
                let res = sender
                    .send_request(req)
                    .await
                    .map_err(|e| client_error("HTTP/2 request", e))?;
                if !res.status().is_success() {
                    return Err(client_error(&format!("GET {path}"), res.status()));
                }
                let body = res
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| client_error("reading a body", e))?
                    .to_bytes();
                Ok::<Bytes, RealnetError>(body)
            }
        };
        let page = get("/".into()).await?;
        let page = String::from_utf8_lossy(&page);
        let assets: Vec<String> = page
            .split("\"/static/")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .map(|name| format!("/static/{name}"))
            .collect();
        if assets.is_empty() {
            return Err(client_error("loading the page", "it names no assets"));
        }
        let requests = 1 + assets.len() as u64;
        let results = futures_util::future::join_all(assets.into_iter().map(get)).await;
        for r in results {
            r?;
        }
        let took = start.elapsed();
        conn.abort();
        Ok((took, requests))
    }
}
