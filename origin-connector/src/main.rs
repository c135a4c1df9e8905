//! `origin-connector`: see the crate docs and `origin-connector --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A proxy allocates and frees small buffers and header maps on every request; the
/// profile in docs/benchmarks.md shows the system allocator as a top cost.
///
/// The `system-allocator` feature turns it off, for heap profilers that watch `malloc`
/// (valgrind's massif, heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use skylane_shared::config::EXIT_CONFIG;

/// The Skylane origin connector: accepts tunnels from edges and forwards to the origin.
#[derive(Debug, Parser)]
#[command(version = skylane_shared::cli::version(), about)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Validate the config and exit (0 when valid, 64 when not).
    #[arg(long)]
    check: bool,
    /// Take over the sockets of the running process of this node (same config): edges move
    /// their new requests to this process while the old one drains and exits.
    #[arg(long)]
    take_over: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a node key pair: FILE (private, mode 0600) and FILE.pub (public key).
    Keygen {
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Show a running connector's view of the mesh: members, routes back to each edge,
    /// probed paths and the gossiped links, read from its admin API.
    Status(skylane_shared::cli::StatusArgs),
    /// Make a running connector read its config file again (as SIGHUP does): services
    /// and log level change; tunnels and streams in flight stay. An invalid config is
    /// refused and the one in force keeps serving.
    Reload(skylane_shared::cli::AdminArgs),
}

fn main() {
    let cli = Cli::parse();
    skylane_shared::cli::exit(real_main(cli));
}

fn real_main(cli: Cli) -> Result<(), i32> {
    match cli.command {
        Some(Command::Keygen { out, force }) => return skylane_shared::cli::keygen(&out, force),
        Some(Command::Status(args)) => {
            return skylane_shared::cli::status(args, cli.config.as_deref(), |path| {
                origin_connector::config::load(path).map(|c| c.admin)
            });
        }
        Some(Command::Reload(target)) => {
            return skylane_shared::cli::reload(target, cli.config.as_deref(), |path| {
                origin_connector::config::load(path).map(|c| c.admin)
            });
        }
        None => {}
    }
    let Some(path) = cli.config else {
        eprintln!("error: --config FILE is required (see --help)");
        return Err(EXIT_CONFIG);
    };
    let config = origin_connector::config::load(&path).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_CONFIG
    })?;
    if cli.check {
        println!("{}: ok", path.display());
        return Ok(());
    }
    let log = config.log.clone();
    let runtime = skylane_shared::cli::Runtime::sharded_for_config(
        config.worker_threads,
        skylane_shared::cli::cpus(),
    );
    skylane_shared::cli::run(&log, runtime, |metrics, shutdown| async move {
        let (mut successor, socket) =
            skylane_shared::cli::take_over_or_bind(cli.take_over, config.listen, &config.identity)
                .await?;
        let listeners =
            origin_connector::server::Listeners::take_or_bind(&config, successor.as_mut()).await?;
        origin_connector::server::serve(
            config, path, socket, listeners, metrics, shutdown, successor,
        )
        .await
    })
}
