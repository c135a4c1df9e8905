//! The tunnel stream protocol: what the edge and the connector say at the start of each
//! QUIC stream.
//!
//! One stream carries one client flow. The edge writes a [`StreamHeader`]; the connector
//! answers with a [`Reply`]. After that the stream carries raw bytes both ways:
//!
//! - HTTP request: the request body follows the header until the edge finishes its side;
//!   the response body follows the [`Reply::Response`] until the connector finishes.
//! - HTTP upgrade (websocket): no request body; once the reply says `101`, the stream
//!   carries the upgraded connection's bytes in both directions, untouched.
//! - TCP: after [`Reply::Connected`], the connection's bytes in both directions.
//!
//! Headers are postcard-encoded and length-prefixed (u32, big-endian) with a hard size
//! cap, so a hostile peer cannot make us allocate without bound.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of the stream protocol; bumped on any incompatible change.
pub const WIRE_VERSION: u16 = 1;

/// Largest encoded header accepted (request heads with large cookies fit easily).
pub const MAX_HEADER_LEN: usize = 256 * 1024;

/// Opens every stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// Must equal [`WIRE_VERSION`].
    pub version: u16,
    /// The connector service the flow is for; the connector refuses names it doesn't know.
    pub service: String,
    /// The user's address as the edge saw it, for `X-Forwarded-For` and logs.
    pub client_addr: Option<SocketAddr>,
    /// Correlates logs across edge, connector and origin (`X-Request-Id`).
    pub request_id: String,
    /// What the flow is.
    pub kind: StreamKind,
}

/// The kind of flow on a stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StreamKind {
    /// An HTTP request (possibly an upgrade) with its head.
    Http(RequestHead),
    /// A raw TCP connection.
    Tcp,
}

/// An HTTP request head, already rewritten by the edge (hop-by-hop headers removed,
/// forwarding headers added).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// The method, e.g. `GET`.
    pub method: String,
    /// Path and query, e.g. `/ws?room=1`.
    pub path: String,
    /// Header fields in order.
    pub headers: WireHeaders,
    /// The request asks to switch protocols (websocket); no body follows the header.
    pub upgrade: bool,
    /// The request has a body (it follows the header until the edge finishes).
    pub has_body: bool,
}

/// The connector's answer to a [`StreamHeader`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The origin's response head; the body (or upgraded bytes) follows.
    Response(ResponseHead),
    /// The TCP connection to the origin is open.
    Connected,
    /// The connector did not forward the flow.
    Refused(Refusal),
}

/// An HTTP response head from the origin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Header fields in order.
    pub headers: WireHeaders,
}

/// Why the connector did not forward a flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The kind, which decides the status the edge shows the user.
    pub kind: RefusalKind,
    /// Human-readable detail for logs (never shown to users verbatim).
    pub message: String,
}

/// Kinds of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    /// The service name is not in the connector's config.
    UnknownService,
    /// The service has no healthy origin server.
    NoHealthyOrigin,
    /// No origin server could be reached.
    OriginUnreachable,
    /// The origin did not answer in time.
    OriginTimeout,
    /// The header could not be decoded or is not supported.
    BadHeader,
    /// The connector is shutting down.
    Draining,
    /// The service carries as many flows as it may; the user should retry shortly.
    Overloaded,
    /// This connector process handed its socket to a successor (a restart with
    /// `--take-over`) and drains: a new tunnel connection to the same connector reaches the
    /// successor. Nothing reached the origin. Last, so older edges decode every other kind.
    Restarting,
}

impl RefusalKind {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::UnknownService => "unknown_service",
            RefusalKind::NoHealthyOrigin => "no_healthy_origin",
            RefusalKind::OriginUnreachable => "origin_unreachable",
            RefusalKind::OriginTimeout => "origin_timeout",
            RefusalKind::BadHeader => "bad_header",
            RefusalKind::Draining => "draining",
            RefusalKind::Overloaded => "overloaded",
            RefusalKind::Restarting => "restarting",
        }
    }
}

/// Errors reading or writing a header frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended early.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is over [`MAX_HEADER_LEN`].
    #[error("header of {0} bytes is over the {MAX_HEADER_LEN}-byte limit")]
    TooLarge(usize),
    /// The bytes are not a valid encoding.
    #[error("malformed header: {0}")]
    Decode(#[from] postcard::Error),
    /// The peer speaks another protocol version.
    #[error("unsupported stream protocol version {0}")]
    Version(u16),
}

/// Encodes one length-prefixed frame.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<bytes::Bytes, WireError> {
    // Encode after a placeholder for the length prefix, then fill it in: one buffer, no
    // copy (this runs for every stream).
    let mut buf = postcard::to_extend(value, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_HEADER_LEN {
        return Err(WireError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf.into())
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode_frame(value)?).await?;
    Ok(())
}

/// Reads one length-prefixed frame.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(postcard::from_bytes(&body)?)
}

/// Reads a [`StreamHeader`] and checks its version.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, WireError> {
    let header: StreamHeader = read_frame(r).await?;
    if header.version != WIRE_VERSION {
        return Err(WireError::Version(header.version));
    }
    Ok(header)
}

/// Header fields as they travel in a head: a sequence of (name, value) pairs, values as
/// bytes because HTTP allows non-UTF-8 values.
///
/// It is an [`http::HeaderMap`] on both ends: encoding reads the map in place and decoding
/// builds the map straight from the frame's bytes, so no field is copied into an
/// intermediate `String`/`Vec` (this runs twice for every request). A field whose name or
/// value is not valid HTTP is skipped on decoding and counted in
/// `skylane_wire_invalid_header_fields_total`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WireHeaders(pub http::HeaderMap);

impl From<http::HeaderMap> for WireHeaders {
    fn from(map: http::HeaderMap) -> Self {
        Self(map)
    }
}

impl Serialize for WireHeaders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            // Encoded like `(String, Vec<u8>)`: a length-prefixed string, then a
            // length-prefixed byte sequence (serde writes a slice as a sequence).
            seq.serialize_element(&(name.as_str(), value.as_bytes()))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for WireHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = WireHeaders;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of header fields")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<WireHeaders, A::Error> {
                // The hint comes from the peer: cap it so a lying length can't make us
                // reserve without bound (the frame itself is capped at MAX_HEADER_LEN).
                let hint = seq.size_hint().unwrap_or(0).min(256);
                let mut map = http::HeaderMap::with_capacity(hint);
                let mut invalid = 0u64;
                while let Some((name, value)) = seq.next_element::<(&'de str, &'de [u8])>()? {
                    match (
                        http::HeaderName::from_bytes(name.as_bytes()),
                        http::HeaderValue::from_bytes(value),
                    ) {
                        (Ok(name), Ok(value)) => {
                            // A HeaderMap holds at most ~24 k distinct names; a peer may
                            // send more (the frame cap allows ~80 k tiny fields).
                            if map.try_append(name, value).is_err() {
                                return Err(serde::de::Error::custom(
                                    "more header fields than a header map can hold",
                                ));
                            }
                        }
                        _ => invalid += 1,
                    }
                }
                if invalid > 0 {
                    metrics::counter!("skylane_wire_invalid_header_fields_total")
                        .increment(invalid);
                }
                Ok(WireHeaders(map))
            }
        }
        d.deserialize_seq(Fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refusal_kinds_keep_their_numbers_so_older_edges_read_all_but_the_newest() {
        // postcard writes a variant's index: a kind added anywhere but last would change
        // what the kinds after it mean to an edge of the version before.
        let kinds = [
            RefusalKind::UnknownService,
            RefusalKind::NoHealthyOrigin,
            RefusalKind::OriginUnreachable,
            RefusalKind::OriginTimeout,
            RefusalKind::BadHeader,
            RefusalKind::Draining,
            RefusalKind::Overloaded,
            RefusalKind::Restarting,
        ];
        for (index, kind) in kinds.into_iter().enumerate() {
            let bytes = postcard::to_allocvec(&kind).expect("encodes");
            assert_eq!(bytes, [index as u8], "{kind:?}");
        }
    }

    fn sample() -> StreamHeader {
        StreamHeader {
            version: WIRE_VERSION,
            service: "web".into(),
            client_addr: Some("203.0.113.9:5000".parse().expect("addr")),
            request_id: "abc".into(),
            kind: StreamKind::Http(RequestHead {
                method: "GET".into(),
                path: "/ws".into(),
                headers: WireHeaders(http::HeaderMap::from_iter([(
                    http::header::HOST,
                    http::HeaderValue::from_static("example.com"),
                )])),
                upgrade: true,
                has_body: false,
            }),
        }
    }

    #[tokio::test]
    async fn header_round_trips() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &sample()).await.expect("write");
        let back = read_header(&mut &buf[..]).await.expect("read");
        assert_eq!(back, sample());
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let huge = (MAX_HEADER_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_header(&mut &huge[..]).await,
            Err(WireError::TooLarge(_))
        ));
        let mut buf = Vec::new();
        write_frame(&mut buf, &sample()).await.expect("write");
        buf.truncate(buf.len() - 3);
        assert!(matches!(
            read_header(&mut &buf[..]).await,
            Err(WireError::Io(_))
        ));
    }

    #[tokio::test]
    async fn wrong_version_is_refused() {
        let mut h = sample();
        h.version = 99;
        let mut buf = Vec::new();
        write_frame(&mut buf, &h).await.expect("write");
        assert!(matches!(
            read_header(&mut &buf[..]).await,
            Err(WireError::Version(99))
        ));
    }

    #[test]
    fn headers_encode_as_name_value_pairs_and_skip_invalid_fields() {
        let mut map = http::HeaderMap::new();
        map.append("x-a", http::HeaderValue::from_static("1"));
        map.append("x-a", http::HeaderValue::from_static("2"));
        map.append(
            "x-bin",
            http::HeaderValue::from_bytes(&[0xff, b'z']).expect("value"),
        );
        let ours = postcard::to_stdvec(&WireHeaders(map.clone())).expect("encode");
        let pairs: Vec<(String, Vec<u8>)> = vec![
            ("x-a".into(), b"1".to_vec()),
            ("x-a".into(), b"2".to_vec()),
            ("x-bin".into(), vec![0xff, b'z']),
        ];
        assert_eq!(ours, postcard::to_stdvec(&pairs).expect("encode"));
        let back: WireHeaders = postcard::from_bytes(&ours).expect("decode");
        assert_eq!(back.0, map);

        let hostile: Vec<(String, Vec<u8>)> = vec![
            ("bad name".into(), b"x".to_vec()),
            ("x-ok".into(), b"fine".to_vec()),
            ("x-nl".into(), b"a\nb".to_vec()),
        ];
        let back: WireHeaders =
            postcard::from_bytes(&postcard::to_stdvec(&hostile).expect("encode")).expect("decode");
        assert_eq!(back.0.len(), 1);
        assert_eq!(back.0.get("x-ok").map(|v| v.as_bytes()), Some(&b"fine"[..]));
    }

    #[test]
    fn more_header_names_than_a_map_holds_is_an_error() {
        let fields: Vec<(String, Vec<u8>)> =
            (0..30_000).map(|i| (format!("x{i}"), Vec::new())).collect();
        let encoded = postcard::to_stdvec(&fields).expect("encode");
        assert!(encoded.len() < MAX_HEADER_LEN);
        let decoded = postcard::from_bytes::<WireHeaders>(&encoded);
        assert!(decoded.is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let mut framed = (data.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&data);
            let _ = rt.block_on(read_header(&mut &framed[..]));
            let _ = rt.block_on(read_frame::<_, Reply>(&mut &framed[..]));
        }
    }
}
