//! The two byte streams of one client flow, whatever carries them.
//!
//! A flow (one HTTP request, websocket or TCP connection) is a pair of ordered byte
//! streams between an edge and a connector: the stream header and the request go one way,
//! the reply and the response the other, and each side ends its direction when done
//! (half-close). Two transports carry that:
//! - a QUIC stream of a mesh tunnel (the default): quinn's halves, used as they are, with
//!   their zero-copy chunk reads and their stream resets;
//! - a TCP connection: through WireGuard (a userspace TCP stack at the edge, the
//!   kernel's on a connector listening on its WireGuard address). Ending a direction is
//!   a FIN; a reset is closing the connection.
//!
//! Everything above (the wire codec, [`crate::pipe`], the edge's upstream phase, the
//! connector's forwarding) speaks these two types and does not care which it got.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read from a TCP flow at once (QUIC hands out what it has, up to the asked size).
const TCP_CHUNK: usize = 16 * 1024;

/// A TCP connection's writing half, which can also end the connection with a reset.
pub trait TcpWrite: AsyncWrite + Send + Sync {
    /// Ends the connection with a reset (RST), so the peer sees an error rather than the
    /// end of the stream a FIN would tell it.
    fn abort(self: Pin<&mut Self>);
}

impl TcpWrite for tokio::net::tcp::OwnedWriteHalf {
    fn abort(self: Pin<&mut Self>) {
        // A zero linger makes the close send a RST, and does not block (the deprecation
        // is about a linger that does).
        #[allow(deprecated)]
        let _ = AsRef::<tokio::net::TcpStream>::as_ref(self.get_mut())
            .set_linger(Some(std::time::Duration::ZERO));
    }
}

impl TcpWrite for crate::wireguard::WgWriteHalf {
    fn abort(self: Pin<&mut Self>) {
        crate::wireguard::WgWriteHalf::abort(&self);
    }
}

/// A writing half with no way to reset (an in-process pipe): dropping it is its end.
struct NoAbort<W>(W);

impl<W: AsyncWrite + Unpin> AsyncWrite for NoAbort<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<W: AsyncWrite + Unpin + Send + Sync> TcpWrite for NoAbort<W> {
    fn abort(self: Pin<&mut Self>) {}
}

/// The sending half of a flow.
pub enum FlowSend {
    /// A QUIC stream's sending half.
    Quic(quinn::SendStream),
    /// A TCP connection's writing half.
    Tcp(Pin<Box<dyn TcpWrite>>),
}

/// The receiving half of a flow.
pub enum FlowRecv {
    /// A QUIC stream's receiving half.
    Quic(quinn::RecvStream),
    /// A TCP connection's reading half.
    Tcp(Pin<Box<dyn AsyncRead + Send + Sync>>),
}

impl std::fmt::Debug for FlowSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Quic(s) => f.debug_tuple("Quic").field(&s.id()).finish(),
            Self::Tcp(_) => f.write_str("Tcp"),
        }
    }
}

impl std::fmt::Debug for FlowRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Quic(s) => f.debug_tuple("Quic").field(&s.id()).finish(),
            Self::Tcp(_) => f.write_str("Tcp"),
        }
    }
}

/// Splits a byte pipe with no reset of its own (an in-process duplex) into the two halves
/// of a flow.
pub fn from_pipe<T>(io: T) -> (FlowSend, FlowRecv)
where
    T: AsyncRead + AsyncWrite + Send + Sync + 'static,
{
    let (r, w) = tokio::io::split(io);
    (
        FlowSend::Tcp(Box::pin(NoAbort(w))),
        FlowRecv::Tcp(Box::pin(r)),
    )
}

/// Splits a TCP flow inside a WireGuard tunnel into the two halves of a flow.
pub fn from_wireguard(io: crate::wireguard::WgStream) -> (FlowSend, FlowRecv) {
    let (r, w) = io.into_split();
    (FlowSend::Tcp(Box::pin(w)), FlowRecv::Tcp(Box::pin(r)))
}

/// Splits a kernel TCP connection into the two halves of a flow.
pub fn from_tokio_tcp(io: tokio::net::TcpStream) -> (FlowSend, FlowRecv) {
    let (r, w) = io.into_split();
    (FlowSend::Tcp(Box::pin(w)), FlowRecv::Tcp(Box::pin(r)))
}

/// The two halves of a QUIC stream as a flow.
pub fn from_quic((send, recv): (quinn::SendStream, quinn::RecvStream)) -> (FlowSend, FlowRecv) {
    (FlowSend::Quic(send), FlowRecv::Quic(recv))
}

impl FlowRecv {
    /// Polls for the next chunk of at most `max` bytes; `None` at the end of the stream.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        match self {
            // Polling a fresh `read_chunk` future each time is sound: it takes data only
            // when it completes, and registers the waker otherwise.
            Self::Quic(recv) => {
                let fut = recv.read_chunk(max, true);
                tokio::pin!(fut);
                match fut.poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(c)) => Poll::Ready(Ok(c.map(|c| c.bytes))),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::other(e))),
                }
            }
            Self::Tcp(io) => {
                let mut buf = BytesMut::zeroed(max.min(TCP_CHUNK));
                let mut rb = ReadBuf::new(&mut buf);
                std::task::ready!(io.as_mut().poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(None));
                }
                buf.truncate(n);
                Poll::Ready(Ok(Some(buf.freeze())))
            }
        }
    }

    /// The next chunk of at most `max` bytes; `None` at the end of the stream.
    pub async fn chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx, max)).await
    }

    /// Reads the end of a stream whose data has all been read, if it is already there, and
    /// says whether it was.
    ///
    /// A QUIC `RecvStream` dropped before its end was read makes quinn send STOP_SENDING,
    /// even when the end had arrived: one spurious frame per stream, and often a packet of
    /// its own, each way, for every request. Polled once with a no-op waker: it never
    /// waits. A TCP flow has no such frame; its end is read the same way.
    pub fn end_if_there(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_chunk(&mut cx, 1) {
            Poll::Ready(Ok(None)) => true,
            Poll::Ready(Ok(Some(extra))) => {
                tracing::debug!(
                    bytes = extra.len(),
                    "data past the announced end of a stream ignored"
                );
                false
            }
            Poll::Ready(Err(_)) | Poll::Pending => false,
        }
    }

    /// Tells the peer nothing more will be read (QUIC's STOP_SENDING; a TCP flow has no
    /// such signal and ends when both halves are dropped).
    pub fn stop(&mut self) {
        if let Self::Quic(r) = self {
            let _ = r.stop(0u32.into());
        }
    }
}

impl AsyncRead for FlowRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(r) => Pin::new(r).poll_read(cx, buf),
            Self::Tcp(r) => r.as_mut().poll_read(cx, buf),
        }
    }
}

impl FlowSend {
    /// Writes all of `data`, waiting for flow-control credit or socket room.
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.write_chunk(data).await.map_err(io::Error::other),
            Self::Tcp(w) => tokio::io::AsyncWriteExt::write_all(w, &data).await,
        }
    }

    /// Writes every chunk, in order: on QUIC in one call, so that a small reply's head
    /// and body leave in one packet.
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.write_all_chunks(chunks).await.map_err(io::Error::other),
            Self::Tcp(w) => {
                for c in chunks.iter() {
                    tokio::io::AsyncWriteExt::write_all(w, c).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends this direction: QUIC's FIN once everything written is sent, TCP's shutdown.
    pub fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Quic(s) => Poll::Ready(s.finish().map_err(io::Error::other)),
            Self::Tcp(w) => w.as_mut().poll_shutdown(cx),
        }
    }

    /// Ends this direction (see [`FlowSend::poll_finish`]).
    pub async fn finish(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_finish(cx)).await
    }

    /// Abandons this direction: the peer sees an error, not an end (QUIC's RESET_STREAM;
    /// a TCP flow is reset as a whole).
    pub fn reset(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(1u32.into());
            }
            Self::Tcp(w) => w.as_mut().abort(),
        }
    }
}

impl AsyncWrite for FlowSend {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::other),
            Self::Tcp(w) => w.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(w) => w.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_finish(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_tcp_flow_carries_chunks_and_half_closes() {
        let (a, b) = tokio::io::duplex(64);
        let (mut a_send, mut a_recv) = from_pipe(a);
        let (mut b_send, mut b_recv) = from_pipe(b);
        let writer = tokio::spawn(async move {
            let mut chunks = [Bytes::from_static(b"head "), Bytes::from(vec![7u8; 1000])];
            a_send.write_all_chunks(&mut chunks).await.expect("write");
            a_send.finish().await.expect("finish");
            a_send
        });
        let mut got = Vec::new();
        while let Some(c) = b_recv.chunk(100).await.expect("read") {
            assert!(c.len() <= 100);
            got.extend_from_slice(&c);
        }
        assert_eq!(got.len(), 1005);
        assert_eq!(&got[..5], b"head ");
        // The other direction still works after the first one ended.
        b_send.write_all(b"reply").await.expect("reply");
        b_send.finish().await.expect("finish");
        let mut reply = Vec::new();
        a_recv.read_to_end(&mut reply).await.expect("read reply");
        assert_eq!(reply, b"reply");
        assert!(a_recv.end_if_there());
        drop(writer.await.expect("writer"));
    }
}
