//! `ws-capacity`: how many idle websockets one edge holds, and what each costs.
//!
//! Starts the real demo-origin, connector and one edge on loopback (the binaries of this
//! build profile), then, each stage on a fresh cluster so one stage's freed memory does not
//! hide the next one's:
//!
//! 1. `tls`: `--count` TLS connections to the edge that finish the handshake and then send
//!    nothing (the edge's cost of a client connection before any request);
//! 2. `websocket`: `--count` websockets through the edge, each sending one message and
//!    reading its echo, then idle.
//!
//! It reports the resident memory (`VmRSS` from `/proc`) of the edge and the connector
//! before and after, per connection, checks that every websocket still echoes at the end,
//! and writes a Markdown table (`--out`). The clients connect from 127.0.0.1 without
//! binding a source address: a socket bound before it connects holds its port for every
//! destination, and 19 000 of them plus the connector's 19 000 connections to the origin
//! would not fit the 28 000 ephemeral ports. The per-client limits are raised for the
//! run. Every wait is bounded; every process is stopped at exit. Loopback only.
//!
//!     cargo run --release -p skylane-tests --bin ws-capacity -- --count 19000 --out docs/ws-capacity.md

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use skylane_tests::{Cluster, ClusterOptions};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "Idle websockets through one edge: how many, and the memory of each")]
struct Args {
    /// Connections per stage.
    #[arg(long, default_value_t = 19_000)]
    count: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Seconds to let each stage settle before memory is read.
    #[arg(long, default_value_t = 5)]
    settle_s: u64,
    /// Write the results (Markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stages to run.
    #[arg(long, value_delimiter = ',', default_values_t = ["tls".to_string(), "websocket".to_string()])]
    stages: Vec<String>,
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect_tls(tls: Arc<rustls::ClientConfig>, edge: SocketAddr) -> anyhow::Result<Tls> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::TcpStream::connect(edge),
    )
    .await
    .context("connect timed out")??;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .context("handshake timed out")??;
    Ok(stream)
}

type Ws = tokio_tungstenite::WebSocketStream<Tls>;

async fn open_ws(tls: Arc<rustls::ClientConfig>, edge: SocketAddr, i: usize) -> anyhow::Result<Ws> {
    let stream = connect_tls(tls, edge).await?;
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", edge.port()), stream),
    )
    .await
    .context("upgrade timed out")??;
    anyhow::ensure!(resp.status() == 101, "status {}", resp.status());
    echo(&mut ws, &format!("hello {i}")).await?;
    Ok(ws)
}

async fn echo(ws: &mut Ws, text: &str) -> anyhow::Result<()> {
    ws.send(Message::Text(text.to_owned().into())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.as_str() == text => return Ok(()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => anyhow::bail!("no echo: {other:?}"),
        }
    }
}

/// Opens `count` things with `open`, `parallel` at a time.
async fn open_all<T, F, Fut>(
    count: usize,
    parallel: usize,
    open: F,
) -> anyhow::Result<(Vec<T>, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let results: Vec<anyhow::Result<T>> = futures_util::stream::iter(0..count)
        .map(&open)
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut ok = Vec::with_capacity(count);
    let mut first_error = None;
    for r in results {
        match r {
            Ok(t) => ok.push(t),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        anyhow::bail!("{} of {count} failed; first: {e:#}", count - ok.len());
    }
    Ok((ok, started.elapsed()))
}

struct Stage {
    name: &'static str,
    count: usize,
    open_s: f64,
    edge_before: u64,
    edge_after: u64,
    conn_before: u64,
    conn_after: u64,
    edge_fds: usize,
    conn_fds: usize,
    checked: usize,
}

impl Stage {
    fn per(&self, before: u64, after: u64) -> f64 {
        after.saturating_sub(before) as f64 / self.count as f64 / 1024.0
    }
}

fn cluster() -> anyhow::Result<Cluster> {
    Cluster::start(ClusterOptions {
        // Let the stage's connections in as fast as the client opens them, keep them as
        // long as it needs, and ping nobody while it reads memory.
        edge_config: "[limits]\nmax_connections_per_ip = 100000\nmax_connections_per_prefix = 100000\nnew_connections_per_ip_per_s = 100000.0\nnew_connections_burst = 100000\nmax_flows_per_ip = 100000\n\n\
                      [timeouts]\nrequest_head_ms = 600000\nwebsocket_ping_interval_ms = 600000\nwebsocket_idle_ms = 1200000\n"
            .into(),
        ..ClusterOptions::default()
    })
}

fn pids(c: &Cluster) -> anyhow::Result<(u32, u32)> {
    Ok((
        c.edges[0].proc.pid().context("edge pid")?,
        c.connector.pid().context("connector pid")?,
    ))
}

async fn run_stage(name: &'static str, args: &Args) -> anyhow::Result<Stage> {
    let c = cluster()?;
    let (edge_pid, conn_pid) = pids(&c)?;
    let tls = Arc::new(skylane_tests::tls_config(&c.ca_pem, &[b"http/1.1"])?);
    let edge = c.edges[0].https;
    // Warm both sides up (first requests allocate pools, caches, TLS tickets).
    for i in 0..20 {
        let mut ws = open_ws(tls.clone(), edge, i).await?;
        let _ = ws.close(None).await;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let (edge_before, conn_before) = (rss(edge_pid), rss(conn_pid));
    eprintln!("ws-capacity: {name}: opening {} …", args.count);
    let mut stage = Stage {
        name,
        count: args.count,
        open_s: 0.0,
        edge_before,
        edge_after: 0,
        conn_before,
        conn_after: 0,
        edge_fds: 0,
        conn_fds: 0,
        checked: 0,
    };
    match name {
        "tls" => {
            let (held, took) = open_all(args.count, args.parallel, |_| {
                connect_tls(tls.clone(), edge)
            })
            .await
            .with_context(|| format!("tls stage\n{}", c.logs()))?;
            stage.open_s = took.as_secs_f64();
            tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
            (stage.edge_after, stage.conn_after) = (rss(edge_pid), rss(conn_pid));
            (stage.edge_fds, stage.conn_fds) = (fds(edge_pid), fds(conn_pid));
            stage.checked = held.len();
        }
        _ => {
            let (mut held, took) =
                open_all(args.count, args.parallel, |i| open_ws(tls.clone(), edge, i))
                    .await
                    .with_context(|| format!("websocket stage\n{}", c.logs()))?;
            stage.open_s = took.as_secs_f64();
            tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
            (stage.edge_after, stage.conn_after) = (rss(edge_pid), rss(conn_pid));
            (stage.edge_fds, stage.conn_fds) = (fds(edge_pid), fds(conn_pid));
            // Every one of them still echoes.
            let results: Vec<anyhow::Result<()>> =
                futures_util::stream::iter(held.iter_mut().enumerate())
                    .map(|(i, ws)| async move { echo(ws, &format!("still {i}")).await })
                    .buffer_unordered(args.parallel)
                    .collect()
                    .await;
            let failed = results.iter().filter(|r| r.is_err()).count();
            anyhow::ensure!(failed == 0, "{failed} websockets no longer echo");
            stage.checked = held.len();
        }
    }
    if std::env::var_os("SKYLANE_EDGE_WRAPPER").is_some() {
        // A profiler writes its report when the edge exits by itself (SIGTERM, drain).
        let mut c = c;
        c.edges[0].proc.terminate();
        let _ = c.edges[0].proc.wait_exit(Duration::from_secs(120));
    }
    eprintln!(
        "ws-capacity: {name}: {} open in {:.1} s; edge {:.1} KiB each, connector {:.1} KiB each",
        stage.count,
        stage.open_s,
        stage.per(stage.edge_before, stage.edge_after),
        stage.per(stage.conn_before, stage.conn_after)
    );
    Ok(stage)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Linux {}, {cpus} CPUs", kernel.trim())
}

fn report(stages: &[Stage], args: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Command: `cargo run --release -p skylane-tests --bin ws-capacity -- --count {}`; machine: {}; {}.\n\n",
        args.count,
        machine(),
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    ));
    s.push_str("| stage | connections | opened in | edge RSS before → after | edge per connection | connector RSS before → after | connector per connection | edge fds | connector fds | still working at the end |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for st in stages {
        s.push_str(&format!(
            "| {} | {} | {:.1} s | {:.1} → {:.1} MiB | **{:.2} KiB** | {:.1} → {:.1} MiB | **{:.2} KiB** | {} | {} | {} |\n",
            st.name,
            st.count,
            st.open_s,
            mib(st.edge_before),
            mib(st.edge_after),
            st.per(st.edge_before, st.edge_after),
            mib(st.conn_before),
            mib(st.conn_after),
            st.per(st.conn_before, st.conn_after),
            st.edge_fds,
            st.conn_fds,
            st.checked
        ));
    }
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = skylane_shared::cli::raise_open_file_limit();
    let mut stages = Vec::new();
    for name in &args.stages {
        let name: &'static str = match name.as_str() {
            "tls" => "tls",
            "websocket" => "websocket",
            other => anyhow::bail!("unknown stage {other:?}: use tls, websocket"),
        };
        stages.push(run_stage(name, &args).await?);
    }
    let table = report(&stages, &args);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
