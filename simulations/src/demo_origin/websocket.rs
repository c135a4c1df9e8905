//! `/ws`: a websocket echo endpoint.
//!
//! Every text and binary message is sent back unchanged; pings are answered by
//! tungstenite itself. The text message `close:CODE:REASON` makes the server
//! start the closing handshake with that code and reason, so tests can check
//! that close codes survive a proxy. Both the HTTP/1.1 `Upgrade` handshake
//! (RFC 6455) and the HTTP/2 extended CONNECT handshake (RFC 8441) are accepted.

use std::time::Duration;

use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Version, header};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Largest message and frame the echo accepts. Tests send 16 MB messages, and a
/// browser may send them as a single frame, so both limits sit above that.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long to wait for the peer's close reply after we sent a close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest close reason that fits a close frame (125-byte payload minus the code).
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// A request that passed websocket handshake validation.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// HTTP/1.1 upgrade: answer `101` with this `Sec-WebSocket-Accept` value.
    Http1 { accept: String },
    /// HTTP/2 extended CONNECT: answer `200`.
    Http2,
}

/// Why a request is not a valid websocket handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Neither `GET` with HTTP/1.1 nor `CONNECT` with `:protocol = websocket`.
    WrongMethod,
    /// `Upgrade: websocket` or `Connection: upgrade` is missing.
    NotAnUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13.
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing or not the base64 of 16 bytes.
    BadKey,
}

impl HandshakeError {
    /// A lowercase description for the error response body.
    pub fn message(&self) -> &'static str {
        match self {
            Self::WrongMethod => "websocket handshake needs GET over HTTP/1.1 or extended CONNECT",
            Self::NotAnUpgrade => "missing `upgrade: websocket` or `connection: upgrade`",
            Self::UnsupportedVersion => "sec-websocket-version must be 13",
            Self::BadKey => "sec-websocket-key must be base64 of 16 bytes",
        }
    }
}

/// Validate a websocket handshake request without consuming it.
pub fn check_handshake<B>(req: &Request<B>) -> Result<Handshake, HandshakeError> {
    let headers = req.headers();
    let is_h2_connect = req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if is_h2_connect {
        check_version(headers)?;
        return Ok(Handshake::Http2);
    }
    if req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(HandshakeError::WrongMethod);
    }
    if !header_has_token(headers, &header::UPGRADE, "websocket")
        || !header_has_token(headers, &header::CONNECTION, "upgrade")
    {
        return Err(HandshakeError::NotAnUpgrade);
    }
    check_version(headers)?;
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .filter(|k| is_valid_key(k))
        .ok_or(HandshakeError::BadKey)?;
    Ok(Handshake::Http1 {
        accept: derive_accept_key(key),
    })
}

fn check_version(headers: &HeaderMap) -> Result<(), HandshakeError> {
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        _ => Err(HandshakeError::UnsupportedVersion),
    }
}

/// Whether any value of `name` holds `token` in its comma-separated list.
fn header_has_token(headers: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 §4.2.1: the key is base64 of 16 random bytes, i.e. 22 base64
/// characters, the last of which carries only 2 significant bits, then `==`.
fn is_valid_key(key: &[u8]) -> bool {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let key = key.trim_ascii();
    let Some((body, padding)) = key.split_at_checked(22) else {
        return false;
    };
    if padding != b"==" {
        return false;
    }
    let sextets: Option<Vec<u8>> = body.iter().map(|&c| sextet(c)).collect();
    match sextets.as_deref() {
        // The final character's low 4 bits would be beyond byte 16: canonical keys have them zero.
        Some([.., last]) => last & 0x0f == 0,
        _ => false,
    }
}

/// Parse the `close:CODE:REASON` command. `None` if `text` is not a close
/// command at all or names a code or reason that cannot go on the wire; such
/// messages are echoed like any other.
pub fn parse_close_command(text: &str) -> Option<CloseFrame> {
    let rest = text.strip_prefix("close:")?;
    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
    let code: u16 = code.parse().ok()?;
    // 1000-2999 are protocol codes (minus those that must never be sent),
    // 3000-4999 are for registered and private use.
    let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !sendable || reason.len() > MAX_CLOSE_REASON_BYTES {
        return None;
    }
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    })
}

/// The websocket configuration for echo connections.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// Finish the upgrade and run the echo loop until either side closes.
pub async fn serve_upgraded(upgrade: hyper::upgrade::OnUpgrade, shutdown: CancellationToken) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config()))
        .await;
    match echo(ws, shutdown).await {
        Ok(()) => debug!("websocket closed"),
        Err(e) => debug!(error = %e, "websocket ended with an error"),
    }
}

type Ws = WebSocketStream<TokioIo<Upgraded>>;

async fn echo(mut ws: Ws, shutdown: CancellationToken) -> Result<(), tungstenite::Error> {
    // Set once we have sent a close frame; from then on we only wait for the reply.
    let mut close_deadline: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            next = next_message(&mut ws, close_deadline) => next,
            () = shutdown.cancelled(), if close_deadline.is_none() => {
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                };
                close_deadline = Some(Instant::now() + CLOSE_REPLY_TIMEOUT);
                ws.close(Some(frame)).await?;
                continue;
            }
        };
        let msg = match next {
            None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(msg)) => msg,
        };
        if close_deadline.is_some() {
            // Data arriving after our close frame is dropped, as RFC 6455 allows.
            continue;
        }
        match msg {
            Message::Text(text) => match parse_close_command(&text) {
                Some(frame) => {
                    debug!(code = u16::from(frame.code), "closing on request");
                    close_deadline = Some(Instant::now() + CLOSE_REPLY_TIMEOUT);
                    ws.close(Some(frame)).await?;
                }
                None => {
                    if text.starts_with("close:") {
                        warn!("unusable close command, echoing it instead");
                    }
                    ws.send(Message::Text(text)).await?;
                }
            },
            Message::Binary(data) => ws.send(Message::Binary(data)).await?,
            // tungstenite queues the pong and the close reply itself; they go
            // out on the next read, and after a close the stream ends.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
}

/// The next message, or `None` once the stream ends or, after we sent a close
/// frame, when the peer has not answered by `close_deadline`.
async fn next_message(
    ws: &mut Ws,
    close_deadline: Option<Instant>,
) -> Option<Result<Message, tungstenite::Error>> {
    match close_deadline {
        None => ws.next().await,
        Some(deadline) => match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(next) => next,
            Err(_) => {
                debug!("peer did not answer our close frame");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h1_request(key: &str) -> Request<()> {
        Request::get("/ws")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", key)
            .body(())
            .expect("valid request")
    }

    #[test]
    fn accepts_rfc_example_key() {
        // The example from RFC 6455 §1.3.
        let got = check_handshake(&h1_request("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(
            got,
            Ok(Handshake::Http1 {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned()
            })
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        for key in [
            "",
            "short==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=!",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25j*Q==",
            "dGhlIHNhbXBsZSBub25jZQ==AA",
        ] {
            assert_eq!(
                check_handshake(&h1_request(key)),
                Err(HandshakeError::BadKey),
                "{key:?}"
            );
        }
    }

    #[test]
    fn rejects_missing_upgrade_and_bad_version() {
        let mut req = h1_request("dGhlIHNhbXBsZSBub25jZQ==");
        req.headers_mut().remove("connection");
        assert_eq!(check_handshake(&req), Err(HandshakeError::NotAnUpgrade));

        let mut req = h1_request("dGhlIHNhbXBsZSBub25jZQ==");
        req.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(
            check_handshake(&req),
            Err(HandshakeError::UnsupportedVersion)
        );

        let mut req = h1_request("dGhlIHNhbXBsZSBub25jZQ==");
        *req.method_mut() = Method::POST;
        assert_eq!(check_handshake(&req), Err(HandshakeError::WrongMethod));
    }

    #[test]
    fn accepts_h2_extended_connect() {
        let mut req = Request::connect("/ws")
            .version(Version::HTTP_2)
            .header("sec-websocket-version", "13")
            .body(())
            .expect("valid request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(check_handshake(&req), Ok(Handshake::Http2));
    }

    #[test]
    fn parses_close_commands() {
        let frame = parse_close_command("close:4001:going away: for real").expect("valid");
        assert_eq!(u16::from(frame.code), 4001);
        assert_eq!(frame.reason.as_str(), "going away: for real");

        let frame = parse_close_command("close:1000").expect("valid");
        assert_eq!(u16::from(frame.code), 1000);
        assert_eq!(frame.reason.as_str(), "");

        let frame = parse_close_command("close:3000:").expect("valid");
        assert_eq!(u16::from(frame.code), 3000);
    }

    #[test]
    fn rejects_unsendable_close_commands() {
        let long = format!("close:4000:{}", "x".repeat(124));
        for text in [
            "hello",
            "close",
            "close:",
            "close:abc:x",
            "close:-1:x",
            "close:70000:x",
            "close:999:x",
            "close:1005:x",
            "close:1006:x",
            "close:1015:x",
            "close:2000:x",
            "close:5000:x",
            long.as_str(),
        ] {
            assert!(parse_close_command(text).is_none(), "{text:?}");
        }
        let max = format!("close:4000:{}", "x".repeat(123));
        assert!(parse_close_command(&max).is_some());
    }
}
