//! `mesh-node`: see the crate docs and `mesh-node --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A proxy allocates and frees small buffers and header maps on every request; the
/// profile in docs/benchmarks.md shows the system allocator as a top cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use skylane_shared::config::EXIT_CONFIG;

/// The Skylane edge node: terminates users' TLS near them and tunnels to the origin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Validate the config (and load its certificates) and exit: 0 when valid, 64 when not.
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
    /// Create a development CA and an edge certificate (for local use only).
    DevCert {
        /// Directory for ca.pem, edge.pem and edge.key.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        /// Names the certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        names: Vec<String>,
    },
    /// Show a running node's view of the mesh: members, routes, probed paths and the
    /// gossiped links, read from its admin API.
    Status(skylane_shared::cli::StatusArgs),
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
                mesh_node::config::load(path).map(|c| c.admin)
            });
        }
        Some(Command::DevCert { out_dir, names }) => {
            let pki = mesh_node::tls::write_dev_pki(&out_dir, &names).map_err(|e| {
                eprintln!("error: {e:#}");
                1
            })?;
            println!("CA certificate:   {}", pki.ca_cert.display());
            println!("edge certificate: {}", pki.cert.display());
            println!("edge key:         {}", pki.key.display());
            return Ok(());
        }
        None => {}
    }
    let Some(path) = cli.config else {
        eprintln!("error: --config FILE is required (see --help)");
        return Err(EXIT_CONFIG);
    };
    let config = mesh_node::config::load(&path).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_CONFIG
    })?;
    if let Some(https) = &config.https
        && let Err(e) = mesh_node::tls::server_config(https)
    {
        eprintln!("error: {}: https.certificates: {e}", path.display());
        return Err(EXIT_CONFIG);
    }
    if cli.check {
        println!("{}: ok", path.display());
        return Ok(());
    }
    let log = config.log.clone();
    skylane_shared::cli::run(
        &log,
        config.worker_threads,
        |metrics, shutdown| async move {
            let socket =
                skylane_shared::cli::bind_mesh_socket(config.listen, &config.identity).await?;
            let listeners = mesh_node::server::Listeners::bind(&config).await?;
            mesh_node::server::serve(config, socket, listeners, metrics, shutdown).await
        },
    )
}
