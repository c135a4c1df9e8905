//! Where users' TLS handshakes run: threads of their own at a lower CPU priority than the
//! threads serving connections that are already open.
//!
//! A handshake is the costliest step an unknown client can make the edge take (a signature
//! and a key exchange: a few hundred microseconds of CPU), and the one an attacker can
//! repeat for nothing. On threads at nice value 10, handshakes get the CPU that is left
//! when established connections (users in the middle of a conversation) have had theirs:
//! under a flood of handshakes the flood slows other handshakes, not the open connections.
//! With CPU to spare, the priority changes nothing.

use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::stream::TlsStream;

/// The nice value of the handshake threads (0 is normal, 19 the lowest priority).
pub const HANDSHAKE_NICE: i32 = 10;

/// The handshake runtime, started on first use and kept for the life of the process.
fn runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("tls-handshake")
                .on_thread_start(lower_priority)
                .enable_all()
                .build();
            match built {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::warn!(error = %e, "no handshake threads: handshakes run with the connections");
                    None
                }
            }
        })
        .as_ref()
}

/// Gives the calling thread the handshake nice value (on Linux, nice is per thread).
fn lower_priority() {
    let this_thread = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(this_thread), HANDSHAKE_NICE) {
        tracing::debug!(error = %e, "cannot lower the priority of a handshake thread");
    }
}

/// Runs `handshake` on the handshake threads and returns its output, or `None` if it has
/// not finished by `deadline`. The deadline is kept by the caller's runtime (its timers do
/// not wait for the lower priority), and a handshake past it, or whose caller is dropped,
/// is cancelled. The sockets a handshake uses stay registered with the runtime that
/// created them; only the CPU work moves.
pub async fn run<F, T>(deadline: tokio::time::Instant, handshake: F) -> Option<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let Some(rt) = runtime() else {
        return tokio::time::timeout_at(deadline, handshake).await.ok();
    };
    let task = tokio_util::task::AbortOnDropHandle::new(rt.spawn(handshake));
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(output)) => Some(output),
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// Accepts a TLS connection on `tcp` on the handshake threads, once `turns` gives it a
/// turn, within `deadline`; `None` past it. The socket itself moves to the handshake
/// runtime for the handshake, so that its readiness events are handled there too, and
/// back to the caller's runtime after.
pub async fn accept(
    deadline: tokio::time::Instant,
    turns: Arc<Semaphore>,
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Option<io::Result<TlsStream<TcpStream>>> {
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => return Some(Err(e)),
    };
    let tls = run(deadline, async move {
        let _turn = turns.acquire_owned().await;
        let tcp = TcpStream::from_std(tcp)?;
        let tls = super::stream::accept(config, tcp).await?;
        tls.map_io(|tcp| tcp.into_std())
    })
    .await?;
    Some(tls.and_then(|tls| tls.map_io(TcpStream::from_std)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshakes_run_on_threads_of_lower_priority() {
        let own = rustix::process::getpriority_process(None).expect("getpriority");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let (name, nice) = run(deadline, async {
            (
                std::thread::current().name().map(str::to_owned),
                rustix::process::getpriority_process(None).expect("getpriority"),
            )
        })
        .await
        .expect("ran");
        assert_eq!(name.as_deref(), Some("tls-handshake"));
        assert_eq!(nice, HANDSHAKE_NICE);
        // The caller's thread keeps its own priority.
        assert_eq!(
            rustix::process::getpriority_process(None).expect("getpriority"),
            own
        );
    }

    #[tokio::test]
    async fn a_socket_accepted_on_the_handshake_threads_serves_on_the_callers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (server_config, client_config) = crate::tls::stream::tests::configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = tokio_rustls::TlsConnector::from(client_config)
                .connect(name, tcp)
                .await
                .expect("client handshake");
            tls.write_all(b"ping").await.expect("write");
            let mut reply = [0u8; 4];
            tls.read_exact(&mut reply).await.expect("read");
            reply
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let turns = Arc::new(Semaphore::new(1));
        let mut tls = accept(deadline, turns, server_config, tcp)
            .await
            .expect("in time")
            .expect("handshake");
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"ping");
        tls.write_all(b"pong").await.expect("server write");
        tls.flush().await.expect("flush");
        assert_eq!(&client.await.expect("client"), b"pong");
    }

    #[tokio::test]
    async fn a_handshake_past_its_deadline_is_cancelled() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let out = run(deadline, async move {
            let _held = tx;
            std::future::pending::<()>().await
        })
        .await;
        assert!(out.is_none());
        // The task's future was dropped, and the sender it held with it.
        let gone = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        assert!(
            matches!(gone, Ok(Err(_))),
            "the handshake task outlived its deadline"
        );
    }
}
