//! A node's data path, one shard per thread.
//!
//! Each shard is a thread with a single-threaded tokio runtime of its own; shard 0 is the
//! main thread, whose runtime also runs the control plane (membership, probes, the admin
//! API) and the QUIC endpoint. A connection is handed to one shard when it is accepted and
//! lives there with every task it spawns: at the edge a client's connection (its TLS, its
//! HTTP, its requests), at the connector a tunnel connection from an edge (its QUIC
//! driver, its streams). Pools prefer what their own shard opened: the edge's tunnel
//! connections, each dialled from the shard that uses it so its driver runs there
//! (`mesh-node`'s `tunnel`), and the connector's connections to origin servers.
//!
//! Why: tokio's multi-threaded runtime spreads a request's tasks (the client connection,
//! the tunnel stream, the QUIC connection's driver, the origin connection) over all its
//! workers, and every hand-over between them is a wake-up on another thread and a trip
//! through a lock. On the 2-core benchmark machine a worker per CPU cost the edge and
//! connector 136 µs of CPU per HTTP/1.1 request, against 96 µs on one thread
//! (`docs/benchmarks.md`, 2026-12-07, late). Shards keep one thread's way of working and
//! still use every core.
//!
//! What it does not do: move a connection between shards once it is placed (new
//! connections are handed out in turn, so long-lived ones spread as they arrive), or shard
//! the QUIC endpoint: datagrams are received on shard 0 and handed to the connection's
//! shard.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The shard the calling thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling task runs on: 0 off the shards' threads (the main thread is
/// shard 0; other threads, such as the edge's TLS handshake threads, count as it too).
pub fn current() -> usize {
    CURRENT.get().unwrap_or(0)
}

/// A node's shards.
#[derive(Debug)]
pub struct Shards {
    /// Each shard's runtime; the first is the main thread's.
    handles: Vec<Handle>,
    /// The shard the next connection goes to (modulo their number).
    next: AtomicUsize,
    /// Ends the threads of shards 1 and up.
    stop: CancellationToken,
}

impl Shards {
    /// `count` shards (at least one): the calling thread's runtime, which must be a
    /// single-threaded one that this thread drives, is shard 0; `count - 1` threads are
    /// started for the others.
    pub fn start(count: usize) -> io::Result<Arc<Self>> {
        let main = Handle::try_current().map_err(io::Error::other)?;
        CURRENT.set(Some(0));
        let stop = CancellationToken::new();
        let mut handles = vec![main];
        for index in 1..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || {
                    CURRENT.set(Some(index));
                    runtime.block_on(stop.cancelled());
                })?;
        }
        Ok(Arc::new(Self {
            handles,
            next: AtomicUsize::new(0),
            stop,
        }))
    }

    /// The shards of a node with `node.worker_threads = worker_threads`
    /// ([`crate::cli::Runtime::sharded_for_config`]), from the main thread's runtime, which
    /// the binary built for the same setting.
    pub fn for_config(worker_threads: Option<usize>) -> io::Result<Arc<Self>> {
        Self::start(
            crate::cli::Runtime::sharded_for_config(worker_threads, crate::cli::cpus()).threads(),
        )
    }

    /// Runs `connection` (the task of a connection just accepted) on the next shard in turn.
    pub fn spawn_connection<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(connection);
    }

    /// Moves `tcp` to the next shard in turn and runs `serve` with it there: the socket
    /// leaves the calling runtime's reactor and joins the shard's, so its readiness events
    /// are handled on the thread that serves it. A socket that cannot move is closed (and
    /// logged).
    pub fn spawn_socket<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to a shard");
                return;
            }
        };
        self.spawn_connection(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::debug!(error = %e, "cannot register a connection on its shard"),
            }
        });
    }

    /// Runs `f` in shard `index`'s runtime context: what it spawns (a QUIC connection's
    /// driver, which quinn spawns when the connection is made) runs on that shard. Shard 0
    /// for an index out of range.
    pub fn within<T>(&self, index: usize, f: impl FnOnce() -> T) -> T {
        let handle = self.handles.get(index).unwrap_or(&self.handles[0]);
        let _entered = handle.enter();
        f()
    }

    /// Ends the threads of shards 1 and up, and the tasks on them.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_each_shard_in_turn_and_stay_on_its_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let shards = Shards::start(3).expect("shards");
            let mut seen = Vec::new();
            for _ in 0..6 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                shards.spawn_connection(async move {
                    let before = (current(), std::thread::current().id());
                    // A task the connection spawns runs on the same shard and thread.
                    let after = tokio::spawn(async { (current(), std::thread::current().id()) })
                        .await
                        .expect("task");
                    let _ = tx.send((before, after));
                });
                let (before, after) = rx.await.expect("ran");
                assert_eq!(before, after);
                seen.push(before.0);
            }
            assert_eq!(seen, vec![0, 1, 2, 0, 1, 2]);
            // What is spawned within a shard's context runs on that shard.
            let (tx, rx) = tokio::sync::oneshot::channel();
            shards.within(2, || {
                tokio::spawn(async move {
                    let _ = tx.send(current());
                })
            });
            assert_eq!(rx.await.expect("ran"), 2);
            shards.stop();
        });
    }
}
