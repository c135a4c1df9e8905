//! Reading requests in the small HTTP/1.1 origins the unit tests stand up on loopback.

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Reads from `tcp` into `seen` until `seen` holds at least `len` bytes; false when the
/// connection ends or fails first.
pub async fn fill(tcp: &mut TcpStream, seen: &mut Vec<u8>, len: usize) -> bool {
    let mut buf = [0u8; 4096];
    while seen.len() < len {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// The next request head from `tcp`, lowercased, taken out of `seen` (what follows it stays
/// there); `None` when the connection ends first.
pub async fn next_head(tcp: &mut TcpStream, seen: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = seen.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).to_ascii_lowercase());
        }
        let more = seen.len() + 1;
        if !fill(tcp, seen, more).await {
            return None;
        }
    }
}
