//! `attack`: the edge under the attacks of issue 10, against the same legitimate load
//! without them.
//!
//! Starts the real demo-origin, connector and one edge on loopback (this build profile's
//! binaries, default policy plus a per-IP rate-limit zone of 100 requests/s), then runs
//! phases of `--phase-s` seconds each. In every phase a legitimate client at 127.0.0.2
//! makes `--legit-rps` HTTPS requests per second (HTTP/1.1 keep-alive, GET /api/time) and
//! records each one's outcome and latency; in every phase but the first, attackers from
//! their own 127.x.y.z addresses (standing in for many machines) run one attack:
//!
//! | attack | what the attackers do |
//! |---|---|
//! | slowloris | 1000 connections send a partial request head, then one header line every 10 s |
//! | idle TLS | 2000 connections finish the TLS handshake and send nothing |
//! | rapid reset | 4 loops from 2 addresses open HTTP/2 connections and send 5000 HEADERS + RST_STREAM pairs each, reconnecting when cut |
//! | request flood | 10 addresses, 8 keep-alive connections each, every connection at most 100 requests/s (8000/s in all) |
//! | websocket flood | 5 addresses open websockets as fast as the edge lets them, up to 400 each, and hold them |
//!
//! The attackers run in a child process at the lowest CPU priority (`nice -n 19`): in a
//! real attack they are other machines, and on this two-core machine they would otherwise
//! take the CPU from the edge and the legitimate client, measuring the load generator
//! rather than the defence. It reports how fast attackers are cut off, how many of their
//! requests reached the connector, and the legitimate success rate and p50/p99 against
//! the baseline phase, as Markdown (`--out`). Every loop is bounded in count and
//! time; every process is stopped at exit; traffic goes to loopback only.
//!
//!     cargo run --release -p skylane-tests --bin attack -- --out docs/attacks-results.md

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use skylane_tests::{Cluster, ClusterOptions, h2raw, metric};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Parser, Debug)]
#[command(about = "The edge under attack, against the same legitimate load without it")]
struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    phase_s: u64,
    /// Legitimate requests per second.
    #[arg(long, default_value_t = 50)]
    legit_rps: u64,
    /// Write the results (Markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Attacks to run after the baseline.
    #[arg(long, value_delimiter = ',', default_values_t = ["slowloris", "idle-tls", "rapid-reset", "request-flood", "websocket-flood"].map(String::from))]
    attacks: Vec<String>,
    /// Internal: run one attack against `--edge` and print its outcome (the harness starts
    /// itself this way, at the lowest CPU priority).
    #[arg(long, hide = true)]
    attacker: Option<String>,
    /// Internal: the edge's HTTPS address.
    #[arg(long, hide = true)]
    edge: Option<SocketAddr>,
    /// Internal: the dev CA.
    #[arg(long, hide = true)]
    ca: Option<PathBuf>,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The shared pieces every client needs.
#[derive(Clone)]
struct Target {
    edge: SocketAddr,
    tls_h1: Arc<rustls::ClientConfig>,
    tls_h2: Arc<rustls::ClientConfig>,
}

impl Target {
    async fn tls(&self, from: IpAddr, h2: bool) -> anyhow::Result<Tls> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = tokio::time::timeout(Duration::from_secs(5), socket.connect(self.edge)).await??;
        let config = if h2 {
            self.tls_h2.clone()
        } else {
            self.tls_h1.clone()
        };
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        Ok(tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await??)
    }
}

fn attacker(i: usize) -> IpAddr {
    IpAddr::from([
        127,
        1 + (i / 60_000) as u8,
        ((i / 250) % 240) as u8,
        (i % 250 + 1) as u8,
    ])
}

/// Latencies of the legitimate client in one phase.
#[derive(Default)]
struct Legit {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u64>,
    failures: Vec<String>,
}

impl Legit {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i] as f64 / 1000.0
    }
    fn success(&self) -> f64 {
        100.0 * self.ok as f64 / (self.ok + self.failed).max(1) as f64
    }
}

async fn legit_load(client: reqwest::Client, url: String, rps: u64, duration: Duration) -> Legit {
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rps.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let until = Instant::now() + duration;
    let mut handles = Vec::new();
    while Instant::now() < until {
        ticker.tick().await;
        let (client, url) = (client.clone(), url.clone());
        handles.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(10), async {
                let resp = client.get(&url).send().await?;
                let status = resp.status();
                let _ = resp.bytes().await?;
                Ok::<_, reqwest::Error>(status)
            })
            .await;
            (started.elapsed(), result)
        }));
    }
    let mut legit = Legit::default();
    for h in handles {
        match h.await {
            Ok((took, Ok(Ok(status)))) if status.is_success() => {
                legit.ok += 1;
                legit.latencies_us.push(took.as_micros() as u64);
            }
            Ok((_, other)) => {
                legit.failed += 1;
                if legit.failures.len() < 5 {
                    legit.failures.push(format!("{other:?}"));
                }
            }
            Err(e) => {
                legit.failed += 1;
                legit.failures.push(e.to_string());
            }
        }
    }
    legit
}

/// What one attack found out (printed by the attacker process).
struct Outcome {
    summary: String,
}

/// Seconds from a connection's start to the edge closing it.
async fn held_until_closed(
    tls: &mut Tls,
    drip: Option<Duration>,
    until: Instant,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let mut next_drip = drip.map(|d| Instant::now() + d);
    let mut n = 0u32;
    loop {
        let wake = next_drip.unwrap_or(until).min(until);
        match tokio::time::timeout_at(wake.into(), tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => {}
        }
        if Instant::now() >= until {
            return None;
        }
        if let (Some(d), Some(at)) = (drip, next_drip)
            && Instant::now() >= at
        {
            n += 1;
            if tls
                .write_all(format!("X-Drip-{n}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
            next_drip = Some(at + d);
        }
    }
}

fn cut_summary(times: &[Option<Duration>], opened: usize, wanted: usize) -> String {
    let mut cut: Vec<f64> = times.iter().flatten().map(|d| d.as_secs_f64()).collect();
    cut.sort_by(f64::total_cmp);
    let held = times.iter().filter(|t| t.is_none()).count();
    let median = cut.get(cut.len() / 2).copied().unwrap_or(f64::NAN);
    let max = cut.last().copied().unwrap_or(f64::NAN);
    format!(
        "{opened} of {wanted} opened; {} cut, median after {median:.1} s, last after {max:.1} s; {held} still open at the phase's end",
        cut.len()
    )
}

async fn slow_or_idle(
    t: &Target,
    count: usize,
    drip: Option<Duration>,
    duration: Duration,
) -> Outcome {
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..count {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut tls = t.tls(attacker(i), false).await.ok()?;
            if drip.is_some()
                && tls
                    .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                    .await
                    .is_err()
            {
                return Some(Some(Duration::ZERO));
            }
            Some(held_until_closed(&mut tls, drip, until).await)
        }));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut times = Vec::new();
    let mut opened = 0;
    for task in tasks {
        if let Ok(Some(t)) = task.await {
            opened += 1;
            times.push(t);
        }
    }
    Outcome {
        summary: cut_summary(&times, opened, count),
    }
}

async fn rapid_reset(t: &Target, duration: Duration) -> Outcome {
    let until = Instant::now() + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let goaways = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut first_cut = Vec::new();
    let mut loops = Vec::new();
    for l in 0..4 {
        let (t, sent, goaways, refused) =
            (t.clone(), sent.clone(), goaways.clone(), refused.clone());
        loops.push(tokio::spawn(async move {
            let mut first: Option<Duration> = None;
            while Instant::now() < until {
                let started = Instant::now();
                let Ok(tls) = t.tls(attacker(l % 2), true).await else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let reader = tokio::spawn(async move { h2raw::read_until_goaway(&mut r).await });
                let mut blast = h2raw::handshake();
                let block = h2raw::get_block("localhost");
                for i in 0..5000u32 {
                    let stream = 1 + 2 * i;
                    h2raw::frame(
                        &mut blast,
                        h2raw::kind::HEADERS,
                        h2raw::END_HEADERS | h2raw::END_STREAM,
                        stream,
                        &block,
                    );
                    h2raw::frame(
                        &mut blast,
                        h2raw::kind::RST_STREAM,
                        0,
                        stream,
                        &8u32.to_be_bytes(),
                    );
                }
                let _ = h2raw::send(&mut w, &blast).await;
                sent.fetch_add(5000, Ordering::Relaxed);
                if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(5), reader).await {
                    goaways.fetch_add(1, Ordering::Relaxed);
                    first.get_or_insert(started.elapsed());
                }
            }
            first
        }));
    }
    for l in loops {
        if let Ok(Some(d)) = l.await {
            first_cut.push(d.as_secs_f64() * 1000.0);
        }
    }
    let sent = sent.load(Ordering::Relaxed);
    Outcome {
        summary: format!(
            "{sent} reset streams sent on {} connections, each ended by GOAWAY (first after {:.0} ms); {} new connections refused by the per-IP rate",
            goaways.load(Ordering::Relaxed),
            first_cut.iter().copied().fold(f64::NAN, f64::min),
            refused.load(Ordering::Relaxed),
        ),
    }
}

async fn request_flood(t: &Target, duration: Duration) -> Outcome {
    let until = Instant::now() + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let mut first_429 = Vec::new();
    let mut tasks = Vec::new();
    for a in 0..10 {
        for _conn in 0..8 {
            let (t, ok, limited, other) = (t.clone(), ok.clone(), limited.clone(), other.clone());
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut first = None;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                'conn: while Instant::now() < until {
                    let Ok(mut tls) = t.tls(attacker(10_000 + a), false).await else {
                        other.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let mut buf = vec![0u8; 8192];
                    while Instant::now() < until {
                        tick.tick().await;
                        if tls
                            .write_all(b"GET /api/time HTTP/1.1\r\nHost: localhost\r\n\r\n")
                            .await
                            .is_err()
                        {
                            continue 'conn;
                        }
                        // One response: head, then the body by Content-Length.
                        let mut got = Vec::new();
                        let status = loop {
                            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
                                .await
                            {
                                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                                _ => continue 'conn,
                            }
                            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head =
                                    String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                                let len: usize = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap_or(0);
                                while got.len() < end + 4 + len {
                                    match tokio::time::timeout(
                                        Duration::from_secs(5),
                                        tls.read(&mut buf),
                                    )
                                    .await
                                    {
                                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                                        _ => continue 'conn,
                                    }
                                }
                                break head.split_whitespace().nth(1).unwrap_or("").to_owned();
                            }
                        };
                        match status.as_str() {
                            "200" => ok.fetch_add(1, Ordering::Relaxed),
                            "429" => {
                                first.get_or_insert(started.elapsed());
                                limited.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => other.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
                first
            }));
        }
    }
    for task in tasks {
        if let Ok(Some(d)) = task.await {
            first_429.push(d.as_secs_f64() * 1000.0);
        }
    }
    let (ok, limited, other) = (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    let total = (ok + limited + other).max(1);
    first_429.sort_by(f64::total_cmp);
    Outcome {
        summary: format!(
            "{total} attack requests ({:.0}/s): {ok} served ({:.1} %, what the 100/s per-address zone allows), {limited} answered 429 ({:.1} %), {other} other; first 429 after a median {:.0} ms per connection",
            total as f64 / duration.as_secs_f64(),
            100.0 * ok as f64 / total as f64,
            100.0 * limited as f64 / total as f64,
            first_429
                .get(first_429.len() / 2)
                .copied()
                .unwrap_or(f64::NAN),
        ),
    }
}

async fn websocket_flood(t: &Target, duration: Duration) -> Outcome {
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for a in 0..5 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut held = Vec::new();
            let (mut refused, mut first_refusal) = (0u64, None);
            for _ in 0..400 {
                if Instant::now() >= until {
                    break;
                }
                let opened = async {
                    let tls = t.tls(attacker(20_000 + a), false).await?;
                    let (ws, _) = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio_tungstenite::client_async(
                            format!("wss://localhost:{}/ws", t.edge.port()),
                            tls,
                        ),
                    )
                    .await??;
                    Ok::<_, anyhow::Error>(ws)
                };
                match opened.await {
                    Ok(ws) => held.push(ws),
                    Err(_) => {
                        refused += 1;
                        first_refusal.get_or_insert(started.elapsed());
                    }
                }
            }
            let open = held.len();
            tokio::time::sleep_until(until.into()).await;
            (open, refused, first_refusal)
        }));
    }
    let (mut open, mut refused, mut firsts) = (0, 0, Vec::new());
    for task in tasks {
        if let Ok((o, r, f)) = task.await {
            open += o;
            refused += r;
            if let Some(f) = f {
                firsts.push(f.as_secs_f64());
            }
        }
    }
    firsts.sort_by(f64::total_cmp);
    Outcome {
        summary: format!(
            "{open} websockets held, {refused} refused (per-IP connection cap and connection rate); first refusal after a median {:.2} s per address",
            firsts.get(firsts.len() / 2).copied().unwrap_or(f64::NAN)
        ),
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Linux {}, {cpus} CPUs", kernel.trim())
}

/// Runs one attack in this process (the child the harness starts) and prints its outcome.
async fn run_attacker(args: &Args, attack: &str) -> anyhow::Result<()> {
    let (Some(edge), Some(ca)) = (args.edge, &args.ca) else {
        anyhow::bail!("--attacker needs --edge and --ca");
    };
    let target = Target {
        edge,
        tls_h1: Arc::new(skylane_tests::tls_config(ca, &[b"http/1.1"])?),
        tls_h2: Arc::new(skylane_tests::tls_config(ca, &[b"h2"])?),
    };
    let phase = Duration::from_secs(args.phase_s);
    let outcome = match attack {
        "slowloris" => slow_or_idle(&target, 1000, Some(Duration::from_secs(10)), phase).await,
        "idle-tls" => slow_or_idle(&target, 2000, None, phase).await,
        "rapid-reset" => rapid_reset(&target, phase).await,
        "request-flood" => request_flood(&target, phase).await,
        "websocket-flood" => websocket_flood(&target, phase).await,
        other => anyhow::bail!("unknown attack {other:?}"),
    };
    println!("{}", outcome.summary);
    Ok(())
}

/// Starts this program as the attacker of one phase, at the lowest CPU priority: the
/// attackers of a real attack run on their own machines, and here they would otherwise
/// take the two cores from the edge they attack, measuring the load generator instead of
/// the defence.
fn spawn_attacker(attack: &str, c: &Cluster, phase_s: u64) -> anyhow::Result<std::process::Child> {
    let me = std::env::current_exe()?;
    Ok(std::process::Command::new("nice")
        .args(["-n", "19"])
        .arg(me)
        .args(["--attacker", attack, "--phase-s", &phase_s.to_string()])
        .arg("--edge")
        .arg(c.edges[0].https.to_string())
        .arg("--ca")
        .arg(&c.ca_pem)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = skylane_shared::cli::raise_open_file_limit();
    if let Some(attack) = &args.attacker {
        return run_attacker(&args, attack).await;
    }
    let c = Cluster::start(ClusterOptions {
        routes: Some(
            "[[routes]]\nhost = \"*\"\nservice = \"web\"\nrate_limits = [\"per-ip\"]\n".into(),
        ),
        edge_config: "[[rate_limits]]\nname = \"per-ip\"\nrequests_per_s = 100.0\nburst = 200\n"
            .into(),
        ..ClusterOptions::default()
    })?;
    let legit_client = {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&c.ca_pem)?)?;
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .resolve("localhost", c.edges[0].https)
            .local_address(IpAddr::from([127, 0, 0, 2]))
            .http1_only()
            .build()?
    };
    let url = c.url(0, "/api/time");
    let phase = Duration::from_secs(args.phase_s);
    let mut rows = Vec::new();
    eprintln!("attack: baseline ({} s)", args.phase_s);
    let baseline = legit_load(legit_client.clone(), url.clone(), args.legit_rps, phase).await;
    rows.push(("none (baseline)".to_string(), "".to_string(), baseline));
    for attack in &args.attacks {
        eprintln!("attack: {attack} ({} s)", args.phase_s);
        let streams_before = metric(c.connector_admin, "skylane_connector_streams_total", "");
        let child = spawn_attacker(attack, &c, args.phase_s)?;
        let legit = legit_load(legit_client.clone(), url.clone(), args.legit_rps, phase).await;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        anyhow::ensure!(out.status.success(), "the {attack} attacker failed");
        let mut summary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let streams =
            metric(c.connector_admin, "skylane_connector_streams_total", "") - streams_before;
        let from_attackers = (streams - legit.ok as f64).max(0.0);
        summary.push_str(&format!(
            "; {from_attackers:.0} attacker requests reached the connector"
        ));
        rows.push((attack.clone(), summary, legit));
        // Let the attack's connections drain before the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let base_p99 = rows[0].2.percentile(99.0);
    let mut md = format!(
        "Command: `cargo run --release -p skylane-tests --bin attack -- --phase-s {} --legit-rps {}`; machine: {}; {}.\n\n\
         | attack | legitimate requests | served | p50 | p99 | p99 vs baseline | what happened to the attackers |\n|---|---:|---:|---:|---:|---:|---|\n",
        args.phase_s,
        args.legit_rps,
        machine(),
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
    for (name, summary, legit) in &rows {
        md.push_str(&format!(
            "| {name} | {} | {:.2} % | {:.2} ms | {:.2} ms | {:.2}× | {summary} |\n",
            legit.ok + legit.failed,
            legit.success(),
            legit.percentile(50.0),
            legit.percentile(99.0),
            legit.percentile(99.0) / base_p99,
        ));
        for f in &legit.failures {
            eprintln!("attack: {name}: a legitimate request failed: {f}");
        }
    }
    println!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
