//! The `UdpPoller` quinn asks an `AsyncUdpSocket` for: waits until the socket under it
//! can take another datagram. Shared by the mesh socket (a UDP socket) and the hand-over
//! pipe (a Unix datagram socket), which differ only in what they wait on.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use quinn::UdpPoller;

/// A wait for writability, boxed so one poller type serves any socket.
pub(crate) type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits, one wait at a time, on the futures `wait` makes; one per quinn task that sends.
pub(crate) struct Writable<F> {
    wait: F,
    pending: Option<WritableFuture>,
}

impl<F> Writable<F>
where
    F: Fn() -> WritableFuture + Send + Sync + Unpin + 'static,
{
    /// A poller that waits on what `wait` returns.
    pub(crate) fn boxed(wait: F) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            wait,
            pending: None,
        })
    }
}

impl<F> fmt::Debug for Writable<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl<F> UdpPoller for Writable<F>
where
    F: Fn() -> WritableFuture + Send + Sync + Unpin + 'static,
{
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        // Neither field is pinned structurally: the future is boxed.
        let this = &mut *self;
        let wait = &this.wait;
        let fut = this.pending.get_or_insert_with(wait);
        let result = fut.as_mut().poll(cx);
        if result.is_ready() {
            this.pending = None;
        }
        result
    }
}
