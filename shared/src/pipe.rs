//! Moving bytes between a tunnel stream and the other side of a proxy, with back-pressure
//! and without buffering whole bodies.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Largest chunk read from a tunnel stream at once. quinn hands out what it has received,
/// so this only bounds one frame of the body, not latency.
const CHUNK: usize = 64 * 1024;

/// An HTTP body that streams a tunnel stream's bytes until the peer finishes it.
pub struct TunnelBody {
    recv: quinn::RecvStream,
    done: bool,
    /// Known total length, when the head carried `Content-Length`, for the size hint.
    expected: Option<u64>,
    /// Bytes handed out so far.
    received: u64,
}

impl TunnelBody {
    /// Wraps a receive stream positioned at the first body byte.
    pub fn new(recv: quinn::RecvStream, expected: Option<u64>) -> Self {
        Self {
            recv,
            done: false,
            expected,
            received: 0,
        }
    }
}

/// Reads the end of a stream whose data has all been read, if it is already there, and
/// says whether it was.
///
/// A `RecvStream` dropped before its end was read makes quinn send STOP_SENDING, even when
/// the end had arrived: one spurious frame per stream, and often a packet of its own, each
/// way, for every request. Polled once with a no-op waker: it never waits.
pub fn read_end_if_there(recv: &mut quinn::RecvStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let fut = recv.read_chunk(1, true);
    tokio::pin!(fut);
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(None)) => true,
        Poll::Ready(Ok(Some(extra))) => {
            tracing::debug!(
                bytes = extra.bytes.len(),
                "data past the announced end of a stream ignored"
            );
            false
        }
        Poll::Ready(Err(_)) | Poll::Pending => false,
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Polling a fresh `read_chunk` future each time is sound: it takes data only when
        // it completes, and registers the waker otherwise.
        let polled = {
            let fut = self.recv.read_chunk(CHUNK, true);
            tokio::pin!(fut);
            fut.poll(cx)
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                self.received += chunk.bytes.len() as u64;
                // hyper stops polling once `Content-Length` bytes came; take the end of the
                // stream now if it came with them, so dropping the body sends nothing.
                if self.expected == Some(self.received) && read_end_if_there(&mut self.recv) {
                    self.done = true;
                }
                Poll::Ready(Some(Ok(Frame::data(chunk.bytes))))
            }
            Poll::Ready(Ok(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(io::Error::other(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.expected == Some(self.received)
    }

    fn size_hint(&self) -> SizeHint {
        match self.expected {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Writes every data frame of `body` to `send`, then finishes the stream. Returns the
/// bytes written. Each write waits for flow-control credit: back-pressure reaches the
/// body's producer.
pub async fn body_to_stream<B>(mut body: B, send: &mut quinn::SendStream) -> io::Result<u64>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| io::Error::other(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            send.write_chunk(data).await.map_err(io::Error::other)?;
        }
    }
    send.finish().map_err(io::Error::other)?;
    Ok(total)
}

/// Writes `head` (an encoded reply), then every data frame of `body`, then finishes the
/// stream. Returns the body bytes written.
///
/// When the body's first frame is ready at once, as it is for most small responses, head,
/// data and the end of the stream go to quinn in one call: one packet on the tunnel and one
/// wake-up of the connection task, where separate writes cost up to three. A body that is
/// not ready (server-sent events, slow origins) does not hold the head back.
pub async fn head_and_body_to_stream<B>(
    head: Bytes,
    mut body: B,
    send: &mut quinn::SendStream,
) -> io::Result<u64>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // One poll with a no-op waker: if the frame is not there yet, the awaits below
    // register the task's real waker before anything waits on it.
    let polled = Pin::new(&mut body).poll_frame(&mut Context::from_waker(std::task::Waker::noop()));
    let (first, ended, failed) = match polled {
        Poll::Ready(Some(Ok(frame))) => (frame.into_data().ok(), false, None),
        Poll::Ready(Some(Err(e))) => (None, false, Some(e.to_string())),
        Poll::Ready(None) => (None, true, None),
        Poll::Pending => (None, false, None),
    };
    let sent = first.as_ref().map_or(0, |d| d.len() as u64);
    let mut chunks = [head, first.unwrap_or_default()];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(io::Error::other)?;
    if let Some(e) = failed {
        return Err(io::Error::other(e));
    }
    if ended || body.is_end_stream() {
        send.finish().map_err(io::Error::other)?;
        return Ok(sent);
    }
    Ok(sent + body_to_stream(body, send).await?)
}

/// Copies bytes both ways between a tunnel stream pair and `io` (an upgraded HTTP
/// connection or a TCP socket) until both directions end. A direction ends when its reader
/// reaches EOF; the writer on the other side is then shut down (half-close carries over).
/// Returns (bytes from the tunnel to `io`, bytes from `io` to the tunnel).
pub async fn splice<IO>(
    mut recv: quinn::RecvStream,
    mut send: quinn::SendStream,
    io: IO,
) -> io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut io_read, mut io_write) = tokio::io::split(io);
    let inbound = async {
        let mut n = 0u64;
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    n += chunk.bytes.len() as u64;
                    io_write.write_all(&chunk.bytes).await?;
                    // A TLS stream may keep encrypted records buffered when its socket was
                    // briefly full; without a flush the tail of a message could wait
                    // forever for a next write that never comes.
                    io_write.flush().await?;
                }
                Ok(None) => break,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let _ = io_write.shutdown().await;
        Ok::<u64, io::Error>(n)
    };
    let outbound = async {
        let n = tokio::io::copy(&mut io_read, &mut send).await;
        let _ = send.finish();
        n
    };
    let (a, b) = tokio::join!(inbound, outbound);
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}
