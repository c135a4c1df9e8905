//! `demo-origin`: the small origin web app behind Skylane in the demo and in
//! end-to-end tests. See `demo_origin` for what it serves.
//!
//! On start it prints exactly one line to stdout,
//! `demo-origin listening on http://ADDR`, which tests parse to learn the port
//! when started with `--listen 127.0.0.1:0`. Logs go to stderr. SIGTERM drains
//! in-flight requests (bounded by a timeout); SIGINT exits at once.

#[path = "../demo_origin/mod.rs"]
mod demo_origin;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use demo_origin::OriginConfig;

/// Exit code for a bad command line (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// How long SIGTERM waits for in-flight requests before exiting anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A tiny origin web app for the Skylane demo and end-to-end tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Name sent in the `X-Origin-Name` header of every response.
    #[arg(long, default_value = "origin")]
    name: String,
    /// While this file exists, `/health` answers 503.
    #[arg(long, value_name = "PATH")]
    fail_health_file: Option<PathBuf>,
    /// Also serve HTTPS here (needs --tls-cert and --tls-key); prints a second line
    /// `demo-origin listening on https://ADDR`. The simulator uses it to measure users
    /// who go straight to the origin.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

/// The TLS side of the command line, validated.
struct TlsArgs {
    listen: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in --tls-cert {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read --tls-key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("--tls-cert and --tls-key do not make a usable certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

enum Signal {
    Terminate,
    Interrupt,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        // --help and --version
        Err(e) => e.exit(),
    };
    let config = match OriginConfig::new(&args.name, args.fail_health_file.clone()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("demo-origin: invalid --name: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let tls = match (&args.tls_listen, &args.tls_cert, &args.tls_key) {
        (Some(listen), Some(cert), Some(key)) => match tls_acceptor(cert, key) {
            Ok(acceptor) => Some(TlsArgs {
                listen: *listen,
                acceptor,
            }),
            Err(e) => {
                eprintln!("demo-origin: {e:#}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => None,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("demo-origin: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args.listen, tls, config));
    // Don't wait for tasks still running after SIGINT or a drain timeout.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-origin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(listen: SocketAddr, tls: Option<TlsArgs>, config: OriginConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let tls = match tls {
        Some(tls) => {
            let listener = TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("cannot listen on --tls-listen {}", tls.listen))?;
            Some((listener, tls.acceptor))
        }
        None => None,
    };
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "demo-origin listening on http://{addr}")
            .and_then(|()| stdout.flush())
            .context("cannot write the listening line to stdout")?;
        if let Some((listener, _)) = &tls {
            let tls_addr = listener
                .local_addr()
                .context("cannot read the bound TLS address")?;
            writeln!(stdout, "demo-origin listening on https://{tls_addr}")
                .and_then(|()| stdout.flush())
                .context("cannot write the listening line to stdout")?;
        }
    }
    info!(%addr, name = config.name(), "demo-origin started");

    let shutdown = CancellationToken::new();
    let tls_server = tls.map(|(listener, acceptor)| {
        tokio::spawn(demo_origin::serve_with(
            listener,
            Some(acceptor),
            config.clone(),
            shutdown.clone(),
        ))
    });
    let mut server = tokio::spawn(demo_origin::serve(listener, config, shutdown.clone()));
    let signal = tokio::select! {
        signal = wait_for_signal() => signal?,
        joined = &mut server => {
            joined.context("server task failed")?;
            return Ok(());
        }
    };
    shutdown.cancel();
    if let Some(tls_server) = tls_server {
        // Drained together with the plain listener below; a TLS server that ends first
        // has nothing left to wait for.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, tls_server).await;
    }
    match signal {
        Signal::Interrupt => info!("SIGINT: exiting now"),
        Signal::Terminate => {
            info!(timeout_s = DRAIN_TIMEOUT.as_secs(), "SIGTERM: draining");
            match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
                Ok(joined) => joined.context("server task failed")?,
                Err(_) => warn!("drain timed out; exiting with requests in flight"),
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => Signal::Terminate,
        _ = int.recv() => Signal::Interrupt,
    })
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<Signal> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for ctrl-c")?;
    Ok(Signal::Interrupt)
}
