//! What both binaries' `main` share: the `keygen` command and the start-up sequence
//! (logs, runtime, metrics, signals, error reporting).

use std::future::Future;
use std::path::Path;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Identity, LogSection};
use crate::identity::NodeKey;
use crate::lifecycle::Shutdown;

/// Writes a new key pair to `out` and `out.pub` and prints the public key. Refuses to
/// overwrite an existing key unless `force`. Returns the process exit code on failure.
pub fn keygen(out: &Path, force: bool) -> Result<(), i32> {
    if out.exists() && !force {
        eprintln!("error: {} exists (use --force to overwrite)", out.display());
        return Err(1);
    }
    let key = NodeKey::generate()
        .and_then(|k| k.save(out).map(|()| k))
        .map_err(|e| {
            eprintln!("error: {e}");
            1
        })?;
    println!("{}", key.id());
    Ok(())
}

/// Sets up logging, a multi-threaded runtime, the metrics recorder and signal handling,
/// then runs `serve` to completion. An error is logged, printed, and becomes exit code 1.
pub fn run<F, Fut>(log: &LogSection, serve: F) -> Result<(), i32>
where
    F: FnOnce(Option<PrometheusHandle>, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init_tracing(log.format, log.level.as_deref());
    let rt = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        1
    })?;
    rt.block_on(async move {
        let metrics = crate::telemetry::install_metrics();
        let shutdown = Shutdown::from_signals()
            .map_err(|e| anyhow::anyhow!("cannot listen for signals: {e}"))?;
        serve(metrics, shutdown).await
    })
    .map_err(|e| {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        1
    })
}

/// Binds the node's mesh socket for `identity`, with an error naming the address.
pub async fn bind_mesh_socket(
    listen: std::net::SocketAddr,
    identity: &Identity,
) -> anyhow::Result<std::sync::Arc<crate::mesh::MeshSocket>> {
    crate::mesh::MeshSocket::bind(listen, &identity.key, identity.members.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the mesh socket on {listen}: {e}"))
}

/// Exits the process with the outcome of a `main`: 0, or the code carried by the error.
pub fn exit(outcome: Result<(), i32>) -> ! {
    std::process::exit(match outcome {
        Ok(()) => 0,
        Err(code) => code,
    })
}
