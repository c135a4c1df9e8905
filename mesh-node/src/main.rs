//! `mesh-node`: see the crate docs and `mesh-node --help`.

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

/// The Skylane edge node: terminates users' TLS near them and tunnels to the origin.
#[derive(Debug, Parser)]
#[command(version = skylane_shared::cli::version(), about)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Validate the config (and load its certificates) and exit: 0 when valid, 64 when not.
    #[arg(long)]
    check: bool,
    /// Take over the sockets of the running process of this node (same config): nothing
    /// is refused while it drains and exits.
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
    /// Switch "under attack" mode (the browser challenge) on or off for a host, on every
    /// edge of the mesh, through this edge's admin API; or list the switches.
    UnderAttack(UnderAttackArgs),
    /// Purge the cache of every edge of the mesh, through this edge's admin API: one URL
    /// (`url chat.example.com/static/app.js`), a prefix, a `Cache-Tag`, or `everything`.
    Purge(PurgeArgs),
    /// Make a running edge read its config file again (as SIGHUP does): routes,
    /// certificates, policies, cache rules and log level change; open connections and
    /// websockets stay. An invalid config is refused and the one in force keeps serving.
    Reload(skylane_shared::cli::AdminArgs),
    /// Print this edge's WireGuard public key, for the `[Peer]` entry of the WireGuard
    /// endpoint it tunnels through: the key of `[wireguard] private_key_file`, or the one
    /// derived from the node key.
    WireguardKey {
        /// Derive it from this node key file instead of reading `--config`.
        #[arg(long, value_name = "FILE")]
        node_key: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct PurgeArgs {
    /// `url`, `prefix`, `tag` or `everything`.
    #[arg(value_parser = ["url", "prefix", "tag", "everything"])]
    kind: String,
    /// `host/path?query` for `url`, `host/path` for `prefix`, the tag for `tag`.
    value: Option<String>,
    /// Which edge to ask.
    #[command(flatten)]
    target: skylane_shared::cli::AdminArgs,
}

fn purge(args: PurgeArgs, config: Option<&std::path::Path>) -> Result<(), i32> {
    let admin = args.target.resolve(config, |path| {
        mesh_node::config::load(path).map(|c| c.admin)
    })?;
    let body = serde_json::json!({"kind": args.kind, "value": args.value}).to_string();
    let answer =
        skylane_shared::cli::admin_call(&admin, "POST", "/purge", Some(&body)).map_err(|e| {
            eprintln!("error: {e:#}");
            1
        })?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    println!(
        "purge {} sent to every edge of the mesh ({} objects removed at this edge)",
        v["id"].as_str().unwrap_or("?"),
        v["removed_here"]
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
struct UnderAttackArgs {
    /// `on`, `off` or `list`.
    #[arg(value_enum)]
    action: UnderAttackVerb,
    /// Host name or pattern (`chat.example.com`, `*.example.com`, `*`); not for `list`.
    host: Option<String>,
    /// How long the switch holds, in seconds (default: until switched again, at most 30
    /// days).
    #[arg(long = "for", value_name = "SECS")]
    for_s: Option<u64>,
    /// Which edge to ask.
    #[command(flatten)]
    target: skylane_shared::cli::AdminArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum UnderAttackVerb {
    On,
    Off,
    List,
}

fn under_attack(args: UnderAttackArgs, config: Option<&std::path::Path>) -> Result<(), i32> {
    let admin = args.target.resolve(config, |path| {
        mesh_node::config::load(path).map(|c| c.admin)
    })?;
    let fail = |e: anyhow::Error| {
        eprintln!("error: {e:#}");
        1
    };
    let on = match args.action {
        UnderAttackVerb::List => {
            let body =
                skylane_shared::cli::admin_call(&admin, "GET", "/status", None).map_err(fail)?;
            let status: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| fail(e.into()))?;
            let switches = status["under_attack"]["switches"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if switches.is_empty() {
                println!("no switches (hosts named in [under_attack] hosts are on)");
            }
            for s in switches {
                println!(
                    "{:<32} {:<4} set by {:<7} on {:<16} expires in {} s",
                    s["host"].as_str().unwrap_or("?"),
                    if s["on"].as_bool().unwrap_or(false) {
                        "on"
                    } else {
                        "off"
                    },
                    s["by"].as_str().unwrap_or("?"),
                    s["written_by"].as_str().unwrap_or("?"),
                    s["expires_in_s"]
                );
            }
            return Ok(());
        }
        UnderAttackVerb::On => true,
        UnderAttackVerb::Off => false,
    };
    let Some(host) = args.host else {
        eprintln!("error: name the host (or pattern) to switch");
        return Err(skylane_shared::config::EXIT_CONFIG);
    };
    let body = serde_json::json!({"host": host, "on": on, "for_s": args.for_s}).to_string();
    skylane_shared::cli::admin_call(&admin, "POST", "/under-attack", Some(&body)).map_err(fail)?;
    println!(
        "under attack {} for {host} on every edge of the mesh",
        if on { "on" } else { "off" }
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    skylane_shared::cli::exit(real_main(cli));
}

fn real_main(cli: Cli) -> Result<(), i32> {
    match cli.command {
        Some(Command::Keygen { out, force }) => return skylane_shared::cli::keygen(&out, force),
        Some(Command::UnderAttack(args)) => return under_attack(args, cli.config.as_deref()),
        Some(Command::Purge(args)) => return purge(args, cli.config.as_deref()),
        Some(Command::Reload(target)) => {
            return skylane_shared::cli::reload(target, cli.config.as_deref(), |path| {
                mesh_node::config::load(path).map(|c| c.admin)
            });
        }
        Some(Command::Status(args)) => {
            return skylane_shared::cli::status(args, cli.config.as_deref(), |path| {
                mesh_node::config::load(path).map(|c| c.admin)
            });
        }
        Some(Command::WireguardKey { node_key }) => {
            use skylane_shared::wireguard::{SecretKey, keys};
            let key = match (node_key, cli.config.as_deref()) {
                (Some(path), _) => {
                    let node = skylane_shared::identity::NodeKey::load(&path).map_err(|e| {
                        eprintln!("error: {e}");
                        EXIT_CONFIG
                    })?;
                    SecretKey::derived_from(&node).map_err(|e| {
                        eprintln!("error: {e}");
                        EXIT_CONFIG
                    })?
                }
                (None, Some(path)) => {
                    let config = mesh_node::config::load(path).map_err(|e| {
                        eprintln!("error: {e}");
                        EXIT_CONFIG
                    })?;
                    match config.wireguard {
                        Some(w) => w.key,
                        None => SecretKey::derived_from(&config.identity.key).map_err(|e| {
                            eprintln!("error: {e}");
                            EXIT_CONFIG
                        })?,
                    }
                }
                (None, None) => {
                    eprintln!("error: give --config FILE or --node-key FILE");
                    return Err(EXIT_CONFIG);
                }
            };
            println!("{}", keys::format_key(&key.public_key()));
            return Ok(());
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
        && !https.certificates.is_empty()
        && let Err(e) = mesh_node::tls::server_config(https, None)
    {
        eprintln!("error: {}: https.certificates: {e}", path.display());
        return Err(EXIT_CONFIG);
    }
    if cli.check {
        println!("{}: ok", path.display());
        return Ok(());
    }
    // One crypto provider for every rustls config the node makes, the ACME client's too.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            mesh_node::server::Listeners::take_or_bind(&config, successor.as_mut()).await?;
        mesh_node::server::serve(
            config, path, socket, listeners, metrics, shutdown, successor,
        )
        .await
    })
}
