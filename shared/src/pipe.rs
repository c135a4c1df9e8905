//! Moving bytes between a tunnel stream and the other side of a proxy, with back-pressure
//! and without buffering whole bodies.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::flow::{FlowRecv, FlowSend};

/// Largest chunk read from a tunnel stream at once. quinn hands out what it has received,
/// so this only bounds one frame of the body, not latency.
const CHUNK: usize = 64 * 1024;

/// An HTTP body that streams a tunnel stream's bytes until the peer finishes it.
pub struct TunnelBody {
    recv: FlowRecv,
    done: bool,
    /// Known total length, when the head carried `Content-Length`, for the size hint.
    expected: Option<u64>,
    /// Bytes handed out so far.
    received: u64,
}

impl TunnelBody {
    /// Wraps a receive stream positioned at the first body byte.
    pub fn new(recv: FlowRecv, expected: Option<u64>) -> Self {
        Self {
            recv,
            done: false,
            expected,
            received: 0,
        }
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
        match self.recv.poll_chunk(cx, CHUNK) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                self.received += chunk.len() as u64;
                // hyper stops polling once `Content-Length` bytes came; take the end of the
                // stream now if it came with them, so dropping the body sends nothing.
                if self.expected == Some(self.received) && self.recv.end_if_there() {
                    self.done = true;
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Ok(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
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
pub async fn body_to_stream<B>(mut body: B, send: &mut FlowSend) -> io::Result<u64>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| io::Error::other(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            send.write_chunk(data).await?;
        }
    }
    send.finish().await?;
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
    send: &mut FlowSend,
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
    send.write_all_chunks(&mut chunks).await?;
    if let Some(e) = failed {
        return Err(io::Error::other(e));
    }
    if ended || body.is_end_stream() {
        send.finish().await?;
        return Ok(sent);
    }
    Ok(sent + body_to_stream(body, send).await?)
}

/// What a [`Splice`] tells its hooks, and may ask of them. The default does nothing:
/// bytes are copied as they come, and the pipe lives as long as both directions do.
pub trait SpliceHooks: Unpin {
    /// `bytes` went from the tunnel to `io` (an edge uses this to follow websocket framing).
    fn sent_down(&mut self, bytes: &[u8]) {
        let _ = bytes;
    }
    /// `n` bytes came from `io` (the client side at an edge).
    fn received_up(&mut self, n: usize) {
        let _ = n;
    }
    /// Polled whenever the downward direction has nothing pending: `Ready(Some(Ok(b)))`
    /// writes `b` to `io` as if it came from the tunnel (a websocket ping, say);
    /// `Ready(Some(Err(e)))` ends the splice with `e` (an idle timeout); `Pending` or
    /// `Ready(None)`: nothing to do now.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let _ = cx;
        Poll::Ready(None)
    }
    /// The tunnel side failed (its stream was reset, or its connection lost) while `io` was
    /// still open: bytes to give `io` before it is closed (a websocket close frame that
    /// tells the client to reconnect), or `None` to just close it. They are written only if
    /// nothing else is waiting to go down, in one try that never waits.
    fn tunnel_failed(&mut self) -> Option<Bytes> {
        None
    }
}

/// Hooks that do nothing.
#[derive(Debug, Default)]
pub struct NoHooks;

impl SpliceHooks for NoHooks {}

/// Ends a splice when no byte has moved either way for a while.
#[derive(Debug)]
pub struct IdleTimeout {
    limit: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeout {
    /// A pipe idle for `limit` ends with [`io::ErrorKind::TimedOut`].
    pub fn new(limit: std::time::Duration) -> Self {
        Self {
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn touch(&mut self) {
        let deadline = tokio::time::Instant::now() + self.limit;
        self.sleep.as_mut().reset(deadline);
    }
}

impl SpliceHooks for IdleTimeout {
    fn sent_down(&mut self, _bytes: &[u8]) {
        self.touch();
    }
    fn received_up(&mut self, _n: usize) {
        self.touch();
    }
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no byte either way within the idle timeout",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Which side of a splice an error came from.
enum Failed {
    /// `io`, the client's side at an edge.
    Io(io::Error),
    /// The tunnel stream.
    Tunnel(io::Error),
}

/// Bytes read from `io` that the tunnel did not take yet, or from the tunnel that `io`
/// did not take yet: the only buffers a splice holds, and only while a direction is
/// blocked.
#[derive(Debug, Default)]
struct Pending {
    bytes: Bytes,
    offset: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.offset >= self.bytes.len()
    }
    fn rest(&self) -> &[u8] {
        &self.bytes[self.offset..]
    }
}

/// Size of the per-thread scratch buffer reads from `io` go into.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Reads from `io` land here and go straight on to the tunnel, so an idle splice holds
    /// no read buffer of its own (thousands of idle websockets, each with an 8 KiB copy
    /// buffer, would cost more than all their other state).
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SCRATCH]);
}

/// Copies bytes both ways between a tunnel stream pair and `io` (an upgraded HTTP
/// connection or a TCP socket) until both directions end. A direction ends when its reader
/// reaches EOF; the writer on the other side is then shut down (half-close carries over).
/// Resolves to (bytes from the tunnel to `io`, bytes from `io` to the tunnel).
///
/// It holds no buffer while idle: reads from `io` go through a per-thread scratch buffer
/// into quinn's send buffer, and chunks from the tunnel are quinn's own; only what the
/// other side cannot take at once is kept. `hooks` see the traffic and may inject bytes
/// or end the splice (see [`SpliceHooks`]).
pub struct Splice<IO, H> {
    recv: FlowRecv,
    send: FlowSend,
    io: IO,
    hooks: H,
    down: Pending,
    /// `io` has bytes written that a flush must push out (a TLS stream buffers records).
    down_unflushed: bool,
    down_done: bool,
    up: Pending,
    /// `io` reached its end; the tunnel's direction is being finished.
    up_ending: bool,
    up_done: bool,
    down_bytes: u64,
    up_bytes: u64,
}

/// A splice without hooks (see [`Splice`]).
pub fn splice<IO>(recv: FlowRecv, send: FlowSend, io: IO) -> Splice<IO, NoHooks>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    Splice::new(recv, send, io, NoHooks)
}

impl<IO, H> Splice<IO, H>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: SpliceHooks,
{
    /// A splice with `hooks`.
    pub fn new(recv: FlowRecv, send: FlowSend, io: IO, hooks: H) -> Self {
        Self {
            recv,
            send,
            io,
            hooks,
            down: Pending::default(),
            down_unflushed: false,
            down_done: false,
            up: Pending::default(),
            up_ending: false,
            up_done: false,
            down_bytes: 0,
            up_bytes: 0,
        }
    }

    /// Tunnel → `io`. `Ready(Ok(()))` once the direction is over.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.down.is_empty() {
                let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, self.down.rest()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.down.offset += n;
                self.down_unflushed = true;
                continue;
            }
            if self.down_unflushed {
                std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                self.down_unflushed = false;
            }
            if self.down_done {
                return Poll::Ready(Ok(()));
            }
            match self.hooks.poll_event(cx) {
                Poll::Ready(Some(Ok(extra))) => {
                    self.down = Pending {
                        bytes: extra,
                        offset: 0,
                    };
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) | Poll::Pending => {}
            }
            match self.recv.poll_chunk(cx, CHUNK) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Some(chunk))) => {
                    self.down_bytes += chunk.len() as u64;
                    self.hooks.sent_down(&chunk);
                    self.down = Pending {
                        bytes: chunk,
                        offset: 0,
                    };
                }
                Poll::Ready(Ok(None)) => {
                    std::task::ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
                    self.down_done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.tunnel_failed(cx, e))),
            }
        }
    }

    /// The tunnel side failed with `e`: gives `io` what the hooks have to say about it, if
    /// anything, in one try that never waits (a client that takes nothing gets nothing), and
    /// returns `e` to end the splice with.
    fn tunnel_failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if !self.down.is_empty() || self.down_done {
            return e;
        }
        let Some(farewell) = self.hooks.tunnel_failed() else {
            return e;
        };
        let mut io = Pin::new(&mut self.io);
        if let Poll::Ready(Ok(n)) = io.as_mut().poll_write(cx, &farewell)
            && n == farewell.len()
        {
            // Shutting down pushes out what a TLS stream buffered (and says goodbye).
            let _ = io.poll_shutdown(cx);
        }
        e
    }

    /// `io` → tunnel. `Ready(Ok(()))` once the direction is over.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.up_done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.up.is_empty() {
                let n = match std::task::ready!(
                    Pin::new(&mut self.send).poll_write(cx, self.up.rest())
                ) {
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Err(self.tunnel_failed(cx, e))),
                };
                self.up.offset += n;
                continue;
            }
            if self.up_ending {
                // A direction that cannot be finished cleanly is over all the same.
                let _ = std::task::ready!(self.send.poll_finish(cx));
                self.up_done = true;
                return Poll::Ready(Ok(()));
            }
            let read = SCRATCH_BUF.with_borrow_mut(|scratch| {
                let mut buf = tokio::io::ReadBuf::new(scratch);
                match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(Failed::Io(e))),
                    Poll::Ready(Ok(())) => {
                        let data = buf.filled();
                        if data.is_empty() {
                            return Poll::Ready(Ok(None));
                        }
                        // Hand quinn what it takes now; keep only the rest.
                        let taken = match Pin::new(&mut self.send).poll_write(cx, data) {
                            Poll::Ready(Ok(n)) => n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Tunnel(e))),
                            Poll::Pending => 0,
                        };
                        Poll::Ready(Ok(Some((
                            data.len(),
                            Bytes::copy_from_slice(&data[taken..]),
                        ))))
                    }
                }
            });
            let read = match std::task::ready!(read) {
                Ok(read) => read,
                Err(Failed::Io(e)) => return Poll::Ready(Err(e)),
                Err(Failed::Tunnel(e)) => return Poll::Ready(Err(self.tunnel_failed(cx, e))),
            };
            match read {
                None => {
                    self.up_ending = true;
                }
                Some((n, rest)) => {
                    self.up_bytes += n as u64;
                    self.hooks.received_up(n);
                    self.up = Pending {
                        bytes: rest,
                        offset: 0,
                    };
                }
            }
        }
    }
}

impl<IO, H> Future for Splice<IO, H>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: SpliceHooks,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let down = this.poll_down(cx)?;
        let up = this.poll_up(cx)?;
        match (down, up) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok((this.down_bytes, this.up_bytes))),
            _ => Poll::Pending,
        }
    }
}
