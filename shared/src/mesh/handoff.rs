//! QUIC across a process hand-over (see [`crate::handover`]): the old process's connections
//! go on through a pipe to the new one, which owns the mesh socket now.
//!
//! - The old process rebinds its quinn endpoint to a [`PipeSocket`]: what quinn sends goes
//!   down the pipe with the peer's virtual address, and what comes up is what the new
//!   process passed back.
//! - The new process's mesh socket hands the pipe every QUIC packet whose destination
//!   connection ID carries the old process's generation ([`Predecessor`]), and sends what
//!   comes down the pipe as its own QUIC frames, on its own routes.
//!
//! Each end of the pipe carries one packet per datagram: the peer's virtual address (16
//! bytes of IPv6 and 2 of port), the ECN mark (one byte), then the packet.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::poller::Writable;
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Bytes in front of each packet on the pipe.
pub const HEADER: usize = 16 + 2 + 1;

/// Writes the pipe header for a packet to or from `peer` into `out` (cleared first).
pub fn encode_header(out: &mut Vec<u8>, peer: SocketAddr, ecn: Option<EcnCodepoint>) {
    out.clear();
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6,
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&peer.port().to_be_bytes());
    out.push(ecn.map_or(0, |e| e as u8));
}

/// The peer, ECN mark and packet of a pipe datagram.
pub fn decode(datagram: &[u8]) -> Option<(SocketAddr, Option<EcnCodepoint>, &[u8])> {
    let (header, packet) = datagram.split_at_checked(HEADER)?;
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&header[..16]);
    let port = u16::from_be_bytes([header[16], header[17]]);
    let ecn = EcnCodepoint::from_bits(header[18]);
    (!packet.is_empty()).then_some((
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port),
        ecn,
        packet,
    ))
}

/// The destination connection ID of a QUIC packet: after the first byte of a short
/// header (`short_len` long, as this mesh's IDs all are), after the version and length
/// byte of a long one.
pub fn destination_cid(packet: &[u8], short_len: usize) -> Option<&[u8]> {
    let first = *packet.first()?;
    if first & 0x80 == 0 {
        packet.get(1..1 + short_len)
    } else {
        let len = usize::from(*packet.get(5)?);
        packet.get(6..6 + len)
    }
}

/// The old process, as the new one's mesh socket sees it.
#[derive(Debug)]
pub struct Predecessor {
    /// The new process's end of the pipe.
    pub pipe: Arc<UnixDatagram>,
    /// The old process's connection-ID generation (the first byte of its IDs).
    pub generation: u8,
    /// The length of the mesh's connection IDs.
    pub cid_len: usize,
}

impl Predecessor {
    /// Whether `packet` belongs to one of the old process's connections.
    pub fn owns(&self, packet: &[u8]) -> bool {
        of_generation(packet, self.generation, self.cid_len)
    }
}

/// Whether `packet`'s destination connection ID is one of generation `generation`'s (IDs
/// `cid_len` long, the generation their first byte).
pub fn of_generation(packet: &[u8], generation: u8, cid_len: usize) -> bool {
    destination_cid(packet, cid_len).is_some_and(|cid| cid.len() == cid_len && cid[0] == generation)
}

/// A quinn socket over the old process's end of the pipe. It sends one packet per
/// datagram (no segmentation offload) and never fragments.
pub struct PipeSocket {
    io: UnixDatagram,
    /// The node's virtual address, as quinn knew its mesh socket's.
    local: SocketAddr,
}

impl fmt::Debug for PipeSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipeSocket")
            .field("local", &self.local)
            .finish()
    }
}

impl PipeSocket {
    /// Wraps the old process's end of the pipe; `local` is the node's virtual address.
    pub fn new(pipe: std::os::unix::net::UnixDatagram, local: SocketAddr) -> io::Result<Self> {
        pipe.set_nonblocking(true)?;
        Ok(Self {
            io: UnixDatagram::from_std(pipe)?,
            local,
        })
    }
}

thread_local! {
    static PIPE_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(2048));
}

impl AsyncUdpSocket for PipeSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Writable::boxed(move || {
            let socket = self.clone();
            Box::pin(async move { socket.io.writable().await })
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        PIPE_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            encode_header(&mut buf, transmit.destination, transmit.ecn);
            buf.extend_from_slice(transmit.contents);
            self.io
                .try_io(Interest::WRITABLE, || self.io.try_send(&buf))
                .map(|_| ())
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        let mut filled = 0;
        while filled < slots {
            if filled == 0 {
                ready!(self.io.poll_recv_ready(cx))?;
            }
            let buf = &mut bufs[filled];
            let n = match self.io.try_recv(buf) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if filled > 0 {
                        break;
                    }
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            let Some((from, ecn, packet)) = decode(&buf[..n]) else {
                continue;
            };
            let len = packet.len();
            buf.copy_within(HEADER..HEADER + len, 0);
            meta[filled] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn,
                dst_ip: None,
            };
            filled += 1;
        }
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_datagrams_round_trip_and_garbage_is_refused() {
        let peer: SocketAddr = "[fd53:6b79:6c61:6e65:1:2:3:4]:1".parse().expect("addr");
        let mut buf = Vec::new();
        encode_header(&mut buf, peer, Some(EcnCodepoint::Ect0));
        buf.extend_from_slice(b"packet");
        assert_eq!(
            decode(&buf),
            Some((peer, Some(EcnCodepoint::Ect0), &b"packet"[..]))
        );
        assert_eq!(decode(&buf[..HEADER]), None);
        assert_eq!(decode(b"short"), None);
    }

    #[test]
    fn connection_ids_are_read_from_both_header_forms() {
        // Short header: flags, then the ID.
        let short = [0x40, 9, 1, 2, 3, 4, 5, 6, 7, 8, 0xff];
        assert_eq!(destination_cid(&short, 9), Some(&short[1..10]));
        // Long header: flags, version, length, ID.
        let long = [0xc0, 0, 0, 0, 1, 3, 9, 8, 7, 0];
        assert_eq!(destination_cid(&long, 9), Some(&long[6..9]));
        assert_eq!(destination_cid(&[0x40, 1], 9), None);
        assert!(of_generation(&short, 9, 9));
        assert!(
            !of_generation(&long, 9, 9),
            "a long header with a 3-byte ID is not the old one's"
        );
        let mut other = short;
        other[1] = 10;
        assert!(!of_generation(&other, 9, 9));
    }
}
