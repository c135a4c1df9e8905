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
use std::sync::OnceLock;

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
