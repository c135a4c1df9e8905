//! Body types of the edge: what it answers with, and the wrappers that enforce a body's
//! idle timeout and hold a flow's resources until its body is done.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, SizeHint};

/// The body type the edge answers with.
pub type ProxyBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A response body from the tunnel that holds `guard` until it is dropped (after its last
/// byte went out, or when the client went away): the request's in-flight mark and its
/// place in the tunnel. Its bytes count in `skylane_edge_bytes_total{direction="to_client"}`
/// when it is dropped.
pub struct Guarded<B, G> {
    inner: B,
    _guard: G,
    bytes: u64,
}

impl<B, G> Guarded<B, G> {
    /// Wraps `inner`.
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            _guard: guard,
            bytes: 0,
        }
    }
}

impl<B, G> Drop for Guarded<B, G> {
    fn drop(&mut self) {
        // One handle for every response: a lookup by name and label per response would
        // hash both each time.
        static TO_CLIENT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
        if self.bytes > 0 {
            TO_CLIENT
                .get_or_init(
                    || metrics::counter!("skylane_edge_bytes_total", "direction" => "to_client"),
                )
                .increment(self.bytes);
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += bytes::Buf::remaining(data) as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client went quiet mid-body.
    #[error("no byte of the request body for {0:?}")]
    Idle(Duration),
    /// The body grew past the route's limit.
    #[error("the request body is over the {0}-byte limit")]
    TooLarge(u64),
    /// The client's connection failed.
    #[error("{0}")]
    Client(Box<dyn std::error::Error + Send + Sync>),
}

/// A request body with an idle timeout and a size cap.
pub struct Bounded<B> {
    inner: B,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: u64,
    seen: u64,
}

impl<B> Bounded<B> {
    /// `inner`, failing after `idle` without a frame or past `limit` bytes.
    pub fn new(inner: B, idle: Duration, limit: u64) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            limit,
            seen: 0,
        }
    }
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(this.idle)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
