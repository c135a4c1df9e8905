//! What both binaries' `main` share: the `keygen` command and the start-up sequence
//! (logs, runtime, metrics, signals, error reporting).

use std::future::Future;
use std::path::Path;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Admin, Identity, LogSection};
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

/// The version `--version` prints and the start-up log shows: the package version, and
/// the commit when the build set `SKYLANE_COMMIT` (`SKYLANE_COMMIT=$(git rev-parse --short
/// HEAD) cargo build …`, as docs/deploy.md and the benchmarks do), so a running binary
/// says which source it came from. Unset, the variable costs no rebuilds.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match option_env!("SKYLANE_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("{} ({commit})", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// The CPUs this process may use (cgroup quotas count); at least 1.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets up logging, the runtime, the metrics recorder and signal handling, then runs
/// `serve` to completion. An error is logged, printed, and becomes exit code 1.
///
/// The binary chooses the runtime from `node.worker_threads` ([`Runtime::for_config`],
/// [`Runtime::sharded_for_config`]). For [`Runtime::Shards`] this builds the runtime of the
/// first shard, on the calling thread; the node starts the others.
pub fn run<F, Fut>(log: &LogSection, runtime: Runtime, serve: F) -> Result<(), i32>
where
    F: FnOnce(Option<PrometheusHandle>, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init_tracing(log.format, log.level.as_deref());
    raise_open_file_limit();
    tracing::info!(version = version(), cpus = cpus(), %runtime, "runtime");
    let mut builder = match runtime {
        Runtime::SingleThread | Runtime::Shards(_) => tokio::runtime::Builder::new_current_thread(),
        Runtime::Workers(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all();
    let rt = builder.build().map_err(|e| {
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

/// The tokio runtime a node runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// tokio's single-threaded runtime.
    SingleThread,
    /// The multi-threaded runtime with this many workers.
    Workers(usize),
    /// This many threads, each with a single-threaded runtime of its own (the first is the
    /// main thread): the node pins each client connection, and the tunnel connections its
    /// requests use, to one of them, so a request's tasks never meet on two threads.
    Shards(usize),
}

impl Runtime {
    /// The runtime for `node.worker_threads` on a machine with `cpus` CPUs (what the
    /// process may use: cgroup quotas count).
    ///
    /// - `1`: single-threaded. No work-stealing queues and no wake-ups handed between
    ///   threads, which cost the multi-threaded runtime about 30 % more CPU per proxied
    ///   request on the 2-core benchmark machine (`docs/benchmarks.md`); the edge's TLS
    ///   handshakes keep threads of their own either way.
    /// - `0` or unset: a worker per CPU, so one node can use every core of its machine,
    ///   as an edge whose traffic (or an attack) fills more than one core needs.
    /// - `n > 1`: `n` workers.
    pub fn for_config(worker_threads: Option<usize>, cpus: usize) -> Self {
        match worker_threads {
            Some(1) => Self::SingleThread,
            None | Some(0) => Self::Workers(cpus.max(1)),
            Some(n) => Self::Workers(n),
        }
    }

    /// The edge's runtime for `node.worker_threads` on a machine with `cpus` CPUs: like
    /// [`Runtime::for_config`], with a shard per thread instead of shared workers (a worker
    /// per CPU cost the edge about 30 % more CPU per proxied request than one thread,
    /// `docs/benchmarks.md`, 2026-12-07, late).
    pub fn sharded_for_config(worker_threads: Option<usize>, cpus: usize) -> Self {
        match Self::for_config(worker_threads, cpus) {
            Self::Workers(1) | Self::SingleThread => Self::SingleThread,
            Self::Workers(n) | Self::Shards(n) => Self::Shards(n),
        }
    }

    /// How many threads serve connections.
    pub fn threads(self) -> usize {
        match self {
            Self::SingleThread => 1,
            Self::Workers(n) | Self::Shards(n) => n,
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SingleThread => f.write_str("single-threaded"),
            Self::Workers(n) => write!(f, "{n} workers"),
            Self::Shards(n) => write!(f, "{n} shards"),
        }
    }
}

/// Raises the soft open-file limit to the hard one (every client connection, websocket
/// and origin connection is a descriptor; the usual soft default of 1024 would cap a node
/// far below what the machine allows), logs it, and returns the limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(open_files = limit, "open-file limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// The open-file limit in force now (soft), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
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

/// The node's mesh socket, and what this process took over: with `take_over`
/// (`--take-over`), the sockets of the running process of the node whose mesh socket is at
/// `listen`, the mesh socket among them; otherwise nothing, and a newly bound mesh socket.
pub async fn take_over_or_bind(
    take_over: bool,
    listen: std::net::SocketAddr,
    identity: &Identity,
) -> anyhow::Result<(
    Option<crate::handover::Successor>,
    std::sync::Arc<crate::mesh::MeshSocket>,
)> {
    if !take_over {
        return Ok((None, bind_mesh_socket(listen, identity).await?));
    }
    let point = crate::handover::point_name(&identity.me.name, listen);
    let mut successor =
        crate::handover::take_over(&point).map_err(|e| anyhow::anyhow!("--take-over: {e}"))?;
    let socket = match successor.take("mesh") {
        Some(fd) => {
            let udp = std::net::UdpSocket::from(fd);
            udp.set_nonblocking(true)?;
            crate::mesh::MeshSocket::from_tokio(
                tokio::net::UdpSocket::from_std(udp)?,
                &identity.key,
                identity.members.clone(),
            )?
        }
        None => bind_mesh_socket(listen, identity).await?,
    };
    Ok((Some(successor), socket))
}

/// The TCP listener labelled `label` that a process took over (`successor`), when it
/// listens on `addr` (or `addr` asks for any port); or else a newly bound one.
pub async fn take_or_bind_listener(
    successor: Option<&mut crate::handover::Successor>,
    label: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    if let Some(fd) = successor.and_then(|s| s.take(label)) {
        let l = std::net::TcpListener::from(fd);
        if l.local_addr().ok() == Some(addr) || addr.port() == 0 {
            l.set_nonblocking(true)?;
            return tokio::net::TcpListener::from_std(l);
        }
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Exits the process with the outcome of a `main`: 0, or the code carried by the error.
pub fn exit(outcome: Result<(), i32>) -> ! {
    std::process::exit(match outcome {
        Ok(()) => 0,
        Err(code) => code,
    })
}

/// Which admin listener a command talks to: `--admin` (and `--token-file`), or else the
/// `[admin]` section of `--config`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Admin listener to ask (default: `[admin] listen` from --config).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// File with the admin bearer token (default: `[admin] token_file` from --config).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// The admin listener to use. `admin_of` is the binary's own config loader.
    pub fn resolve<E: std::fmt::Display>(
        &self,
        config: Option<&Path>,
        admin_of: impl FnOnce(&Path) -> Result<Option<Admin>, E>,
    ) -> Result<Admin, i32> {
        let from_config = match config {
            Some(path) => match admin_of(path) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Err(crate::config::EXIT_CONFIG);
                }
            },
            None => None,
        };
        let token = match &self.token_file {
            Some(f) => match std::fs::read(f) {
                Ok(b) => Some(crate::config::Secret(b.trim_ascii().to_vec())),
                Err(e) => {
                    eprintln!("error: --token-file {}: {e}", f.display());
                    return Err(crate::config::EXIT_CONFIG);
                }
            },
            None => from_config.as_ref().and_then(|a| a.token.clone()),
        };
        match (self.admin, from_config) {
            (Some(listen), _) => Ok(Admin { listen, token }),
            (None, Some(a)) => Ok(Admin {
                listen: a.listen,
                token,
            }),
            (None, None) => {
                match config {
                    Some(path) => eprintln!(
                        "error: {} has no [admin] listener; pass --admin ADDR",
                        path.display()
                    ),
                    None => eprintln!("error: --config FILE or --admin ADDR is required"),
                }
                Err(crate::config::EXIT_CONFIG)
            }
        }
    }
}

/// Arguments of the `status` subcommand both binaries have.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Which node to ask.
    #[command(flatten)]
    pub target: AdminArgs,
    /// Print the raw /status JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `status`: fetches a running node's `/status` from its admin listener and prints the
/// mesh view as tables (or the raw JSON). The address comes from `--admin`, or else from
/// the config file, read by `admin_of` (the binary's own config loader).
pub fn status<E: std::fmt::Display>(
    args: StatusArgs,
    config: Option<&Path>,
    admin_of: impl FnOnce(&Path) -> Result<Option<Admin>, E>,
) -> Result<(), i32> {
    let admin = args.target.resolve(config, admin_of)?;
    let addr = admin.listen;
    let body = admin_call(&admin, "GET", "/status", None).map_err(|e| {
        eprintln!("error: cannot read the status from the admin API at {addr}: {e:#}");
        1
    })?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
        eprintln!("error: {addr}/status is not JSON: {e}");
        1
    })?;
    let mesh: crate::mesh::control::MeshStatus = serde_json::from_value(value["mesh"].clone())
        .map_err(|e| {
            eprintln!("error: {addr}/status has no mesh view this version understands: {e}");
            1
        })?;
    print!("{}", crate::mesh::status_table::render(&mesh));
    Ok(())
}

/// `reload`: asks a running node to read its config file again (as SIGHUP does) and
/// prints what changed, or why the node refused the new config.
pub fn reload<E: std::fmt::Display>(
    target: AdminArgs,
    config: Option<&Path>,
    admin_of: impl FnOnce(&Path) -> Result<Option<Admin>, E>,
) -> Result<(), i32> {
    let admin = target.resolve(config, admin_of).inspect_err(|_| {
        eprintln!("(the running node was not asked to reload; --admin ADDR asks it directly)");
    })?;
    let answer = admin_call(&admin, "POST", "/reload", Some("{}")).map_err(|e| {
        eprintln!("error: {e:#}");
        1
    })?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    let changed: Vec<&str> = v["changed"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    println!(
        "reloaded: config generation {}; changed: {}",
        v["generation"],
        if changed.is_empty() {
            "nothing".to_owned()
        } else {
            changed.join(", ")
        }
    );
    Ok(())
}

/// One request to an admin listener over plain HTTP/1.0 with a short timeout; the body
/// of a 200 answer, or an error carrying the status and the node's reason.
pub fn admin_call(
    admin: &Admin,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::io::{Read as _, Write as _};
    let addr = admin.listen;
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .context("connect (is the node running with [admin] enabled?)")?;
    stream.set_read_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(token) = &admin.token {
        head.push_str(&format!(
            "Authorization: Bearer {}\r\n",
            String::from_utf8_lossy(&token.0)
        ));
    }
    let body = json_body.unwrap_or("");
    if json_body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    write!(stream, "{head}\r\n{body}")?;
    let mut response = String::new();
    stream
        .take(16 << 20)
        .read_to_string(&mut response)
        .context("read")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let code = head.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        anyhow::bail!("HTTP status {code}: {}", body.trim());
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::Runtime;

    #[test]
    fn the_default_runtime_is_a_worker_per_cpu() {
        assert_eq!(Runtime::for_config(None, 2), Runtime::Workers(2));
        assert_eq!(Runtime::for_config(None, 16), Runtime::Workers(16));
        assert_eq!(Runtime::for_config(None, 0), Runtime::Workers(1));
    }

    #[test]
    fn a_configured_thread_count_wins() {
        assert_eq!(Runtime::for_config(Some(1), 16), Runtime::SingleThread);
        assert_eq!(Runtime::for_config(Some(0), 2), Runtime::Workers(2));
        assert_eq!(Runtime::for_config(Some(0), 0), Runtime::Workers(1));
        assert_eq!(Runtime::for_config(Some(4), 2), Runtime::Workers(4));
    }

    #[test]
    fn the_edge_shards_what_would_be_workers() {
        assert_eq!(Runtime::sharded_for_config(None, 2), Runtime::Shards(2));
        assert_eq!(Runtime::sharded_for_config(None, 1), Runtime::SingleThread);
        assert_eq!(
            Runtime::sharded_for_config(Some(1), 16),
            Runtime::SingleThread
        );
        assert_eq!(Runtime::sharded_for_config(Some(3), 2), Runtime::Shards(3));
        assert_eq!(Runtime::sharded_for_config(Some(3), 2).threads(), 3);
        assert_eq!(Runtime::SingleThread.threads(), 1);
    }
}
