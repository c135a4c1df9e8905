//! Hand-made HTTP/2 frames, for the attacks a well-behaved client library will not send:
//! rapid reset (CVE-2023-44487) and CONTINUATION floods.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types used here.
pub mod kind {
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// END_STREAM flag.
pub const END_STREAM: u8 = 0x1;
/// END_HEADERS flag.
pub const END_HEADERS: u8 = 0x4;
/// ACK flag (SETTINGS).
pub const ACK: u8 = 0x1;

/// Appends one frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK block for `GET https://<authority>/` (static-table indices, a literal
/// authority without indexing).
pub fn get_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01];
    b.push(authority.len() as u8);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// The preface, an empty SETTINGS frame and the ACK of the server's (sent blind: the
/// server's SETTINGS always comes first).
pub fn handshake() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, kind::SETTINGS, 0, 0, &[]);
    frame(&mut out, kind::SETTINGS, ACK, 0, &[]);
    out
}

/// Reads frames until the server sends GOAWAY or closes; returns whether a GOAWAY came.
pub async fn read_until_goaway<R: AsyncRead + Unpin>(r: &mut R) -> bool {
    let mut head = [0u8; 9];
    loop {
        if r.read_exact(&mut head).await.is_err() {
            return false;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len.min(1 << 20)];
        if r.read_exact(&mut payload).await.is_err() {
            return false;
        }
        if head[3] == kind::GOAWAY {
            return true;
        }
    }
}

/// Writes `bytes`, reporting whether the connection took them.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> bool {
    w.write_all(bytes).await.is_ok() && w.flush().await.is_ok()
}
