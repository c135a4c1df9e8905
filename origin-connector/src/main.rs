//! `origin-connector`: see the crate docs and `origin-connector --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use skylane_shared::config::EXIT_CONFIG;
use skylane_shared::identity::NodeKey;

/// The Skylane origin connector: accepts tunnels from edges and forwards to the origin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config and exit (0 when valid, 64 when not).
    #[arg(long)]
    check: bool,
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
}

fn main() {
    let cli = Cli::parse();
    std::process::exit(match real_main(cli) {
        Ok(()) => 0,
        Err(code) => code,
    });
}

fn real_main(cli: Cli) -> Result<(), i32> {
    if let Some(Command::Keygen { out, force }) = cli.command {
        return keygen(&out, force);
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
    skylane_shared::telemetry::init_tracing(config.log.format, config.log.level.as_deref());
    let rt = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        1
    })?;
    rt.block_on(async move {
        let metrics = skylane_shared::telemetry::install_metrics();
        let shutdown = skylane_shared::lifecycle::Shutdown::from_signals()
            .map_err(|e| anyhow::anyhow!("cannot listen for signals: {e}"))?;
        let socket = skylane_shared::mesh::MeshSocket::bind(
            config.listen,
            config.identity.key.id(),
            config.identity.members.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the mesh socket on {}: {e}", config.listen))?;
        let admin =
            match config.admin {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot bind the admin listener on {addr}: {e}")
                })?),
                None => None,
            };
        origin_connector::server::serve(config, socket, admin, metrics, shutdown).await
    })
    .map_err(|e: anyhow::Error| {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        1
    })
}

fn keygen(out: &std::path::Path, force: bool) -> Result<(), i32> {
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
