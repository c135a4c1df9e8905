//! `simulate`: the region simulator's command line.
//!
//! Subcommands run the virtual-time network in `skylane_simulations::vnet` with the real
//! routing core on every node. Today: `routes` (chosen vs optimal routes per edge, plus
//! injected failures) and `evaluate` (convergence, gossip bandwidth, failover percentiles,
//! flapping). `wan` is different: it runs one real WAN-emulator link
//! (`skylane_simulations::wan`) in front of a real process, until Ctrl-C, for manual use —
//! e.g. `simulate wan --listen 127.0.0.1:8081 --target 127.0.0.1:8080 --rtt-ms 100 --tcp`
//! then `curl http://127.0.0.1:8081/`. The subcommand layout leaves room for later ones
//! `run --scenario FILE --out DIR` runs a scenario (real processes or `--mode virtual`) and
//! writes a report; `demo` is the README's first command.

#[path = "simulate/run_cmd.rs"]
mod run_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use skylane_simulations::vnet::experiments::{self, EdgeRoute, FailoverSummary};
use skylane_simulations::vnet::{NetConfig, RttMatrix};
use skylane_simulations::wan::{LinkProfile, TcpOptions, UdpOptions, Wan};

/// Exit code for a bad command line or unusable input (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Skylane region simulator (virtual time, deterministic per seed).
#[derive(Parser, Debug)]
#[command(name = "simulate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Converge a mesh on an RTT matrix and compare each edge's route to the origin with
    /// the true optimum; optionally inject failures and time the failovers.
    Routes(RoutesArgs),
    /// Measure convergence, gossip bandwidth (N = matrix size and a synthetic N), failover
    /// percentiles and flapping under jitter.
    Evaluate(EvaluateArgs),
    /// Put an emulated WAN link (latency, jitter, loss) in front of a real process: relay
    /// TCP and/or UDP from --listen to --target until Ctrl-C. Real time, not virtual.
    Wan(WanArgs),
    /// Run a scenario file (topology, clients, workload, faults) with the real binaries on
    /// loopback behind emulated WAN links, or in virtual time; write a report.
    Run(run_cmd::RunArgs),
    /// The demo: origin in Frankfurt, edges in six regions on emulated links; measures,
    /// prints the comparison, then serves the chat page through each edge until Ctrl-C.
    Demo(run_cmd::DemoArgs),
}

#[derive(Args, Debug)]
struct WanArgs {
    /// Address to listen on: clients connect (TCP) or send (UDP) here.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Address traffic is relayed to.
    #[arg(long, value_name = "ADDR")]
    target: SocketAddr,
    /// Round-trip time the link adds, in ms; each direction adds half.
    #[arg(long, value_name = "MS")]
    rtt_ms: f64,
    /// Uniform per-packet jitter on each one-way delay, ± ms (at most rtt / 2).
    #[arg(long, value_name = "MS", default_value_t = 0.0)]
    jitter_ms: f64,
    /// Loss probability per packet and direction, 0..=1 (on TCP: a stall of one RTO).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    loss: f64,
    /// Relay TCP only (default: TCP and UDP, on the same port number).
    #[arg(long, conflicts_with = "udp")]
    tcp: bool,
    /// Relay UDP only.
    #[arg(long)]
    udp: bool,
    /// Seed of the jitter and loss draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Mesh selection shared by the subcommands.
#[derive(Args, Debug)]
struct MeshArgs {
    /// RTT matrix CSV: header `region,<names>`, one row per region, symmetric, ms.
    /// Default: the measured 30-city matrix built into `simulate`.
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    /// Region that hosts the origin connector; every other region is an edge.
    #[arg(long, value_name = "NAME")]
    origin: String,
    /// Seed of every random choice; the same seed replays the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl MeshArgs {
    /// The matrix as reports and errors name it.
    fn matrix_name(&self) -> String {
        match &self.matrix {
            Some(p) => p.display().to_string(),
            None => skylane_simulations::vnet::matrix::BUILTIN_NAME.into(),
        }
    }
}

#[derive(Args, Debug)]
struct RoutesArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// Where to write the JSON report.
    #[arg(long, value_name = "OUT.json")]
    report: PathBuf,
    /// Failures to inject after convergence (alternately: kill the relay carrying a flow,
    /// cut a link carrying a flow), each on a copy of the converged mesh.
    #[arg(long, default_value_t = 0, value_name = "K")]
    failures: usize,
    /// Virtual seconds to run before reading routes.
    #[arg(long, default_value_t = 60)]
    settle_s: u64,
}

#[derive(Args, Debug)]
struct EvaluateArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// Where to write the JSON report.
    #[arg(long, value_name = "OUT.json")]
    report: PathBuf,
    /// Failover runs.
    #[arg(long, default_value_t = 200)]
    failures: usize,
    /// Simulated minutes of the flapping run (±20 % jitter).
    #[arg(long, default_value_t = 60)]
    flap_minutes: u64,
    /// Size of the synthetic mesh for the bandwidth comparison.
    #[arg(long, default_value_t = 100)]
    synthetic_nodes: usize,
}

#[derive(Serialize)]
struct RoutesReport {
    matrix: String,
    origin: String,
    seed: u64,
    settle_s: u64,
    edges: Vec<EdgeRoute>,
    summary: experiments::RouteSummary,
    failures: Vec<experiments::FailureResult>,
    failover: Option<FailoverSummary>,
}

fn load(mesh: &MeshArgs) -> anyhow::Result<(RttMatrix, usize)> {
    let matrix = RttMatrix::from_file_or_builtin(mesh.matrix.as_deref())
        .with_context(|| format!("loading matrix {}", mesh.matrix_name()))?;
    let Some(origin) = matrix.index_of(&mesh.origin) else {
        bail!(
            "--origin: `{}` is not a region of {} (regions: {})",
            mesh.origin,
            mesh.matrix_name(),
            matrix.names().join(", ")
        );
    };
    Ok((matrix, origin))
}

fn write_json<T: Serialize>(path: &PathBuf, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value).context("encoding report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

fn print_routes(edges: &[EdgeRoute], summary: &experiments::RouteSummary) {
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>7}  chosen path",
        "edge", "direct", "chosen", "optimal", "gain"
    );
    for e in edges {
        println!(
            "{:<14} {:>9.1} {:>9.1} {:>9.1} {:>6.1}%  {}",
            e.region,
            e.direct_rtt_ms,
            e.chosen_rtt_ms,
            e.optimal_rtt_ms,
            e.improvement_percent,
            e.chosen_path.join(" > ")
        );
    }
    println!(
        "{} edges, {} relayed, {} within 5 % of optimal (worst gap {:.2} %); mean RTT direct {:.1} ms, chosen {:.1} ms, optimal {:.1} ms; mean improvement {:.1} %",
        summary.edges,
        summary.relayed,
        summary.within_5_percent,
        summary.max_gap_to_optimal_percent,
        summary.mean_direct_rtt_ms,
        summary.mean_chosen_rtt_ms,
        summary.mean_optimal_rtt_ms,
        summary.mean_improvement_percent
    );
}

fn print_failover(summary: &FailoverSummary) {
    println!(
        "failover: {} runs, {} recovered; detect p50 {:.0} ms; recover p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        summary.runs,
        summary.recovered,
        summary.detect_p50_ms,
        summary.recover_p50_ms,
        summary.recover_p99_ms,
        summary.recover_max_ms
    );
}

fn routes(args: &RoutesArgs) -> anyhow::Result<()> {
    let (matrix, origin) = load(&args.mesh)?;
    let net = experiments::converge(
        &matrix,
        origin,
        NetConfig::default(),
        args.mesh.seed,
        args.settle_s * 1000,
    )?;
    let edges = experiments::edge_routes(&net, &matrix, origin);
    let summary = experiments::summarize(&edges);
    print_routes(&edges, &summary);
    let failures =
        experiments::inject_failures(&net, &matrix, origin, args.failures, args.mesh.seed);
    let failover = (!failures.is_empty()).then(|| experiments::summarize_failures(&failures));
    if !failures.is_empty() {
        println!();
        println!(
            "{:<10} {:<14} {:<24} {:>9} {:>10}  path after",
            "failure", "edge", "element", "detect", "recover"
        );
        for f in &failures {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "{:<10} {:<14} {:<24} {:>9} {:>10}  {}",
                format!("{:?}", f.kind),
                f.edge,
                f.element,
                ms(f.detect_ms),
                ms(f.recover_ms),
                f.path_after.join(" > ")
            );
        }
    }
    if let Some(summary) = &failover {
        print_failover(summary);
    }
    write_json(
        &args.report,
        &RoutesReport {
            matrix: args.mesh.matrix_name(),
            origin: args.mesh.origin.clone(),
            seed: args.mesh.seed,
            settle_s: args.settle_s,
            edges,
            summary,
            failures,
            failover,
        },
    )
}

#[derive(Serialize)]
struct EvaluateReport {
    convergence: experiments::ConvergenceReport,
    propagation: experiments::PropagationReport,
    bandwidth: Vec<experiments::BandwidthReport>,
    failover: FailoverSummary,
    flapping: experiments::FlappingReport,
    dataplane: Option<experiments::DataPlaneReport>,
}

fn evaluate(args: &EvaluateArgs) -> anyhow::Result<()> {
    let (matrix, origin) = load(&args.mesh)?;
    let seed = args.mesh.seed;
    let (convergence, mut net) =
        experiments::convergence(&matrix, origin, NetConfig::default(), seed, 60_000)?;
    println!("convergence: {convergence:?}");
    let failures = experiments::inject_failures(&net, &matrix, origin, args.failures, seed);
    let failover = experiments::summarize_failures(&failures);
    print_failover(&failover);
    // The slowest link out of the origin region's neighbourhood: a link no one can
    // measure but its two ends.
    let (a, b) = (1 % matrix.len(), (matrix.len() - 1).max(2) % matrix.len());
    let propagation = experiments::propagation(&mut net, &matrix, a, b, 1.5);
    println!("propagation: {propagation:?}");
    let mut bandwidth = vec![experiments::bandwidth(
        &matrix,
        origin,
        NetConfig::default(),
        seed,
        60_000,
        60_000,
    )?];
    let synthetic = RttMatrix::synthesize(args.synthetic_nodes, seed);
    bandwidth.push(experiments::bandwidth(
        &synthetic,
        0,
        NetConfig::default(),
        seed,
        60_000,
        60_000,
    )?);
    for b in &bandwidth {
        println!("bandwidth: {b:?}");
    }
    let flapping = experiments::flapping(
        &matrix,
        origin,
        NetConfig::default(),
        seed,
        args.flap_minutes * 60_000,
        0.2,
    )?;
    println!("flapping: {flapping:?}");
    let dataplane = experiments::dataplane_failover(
        &matrix,
        origin,
        NetConfig::default(),
        seed,
        experiments::DataPlanePlan::default(),
    )?;
    match &dataplane {
        Some(d) => println!(
            "dataplane: {} via {} ({} → {}): {} of {} packets delivered intact ({} QUIC, {} WireGuard); the relay forwarded {} and opened {}; after its crash packets flowed again in {:.0} ms, {} lost",
            d.edge,
            d.relay,
            d.path_before.join("→"),
            d.path_after.join("→"),
            d.delivered,
            d.sent,
            d.delivered_quic,
            d.delivered_wireguard,
            d.forwarded_by_relay,
            d.opened_by_relay,
            d.recovered_ms.unwrap_or(f64::NAN),
            d.lost_after_crash
        ),
        None => println!("dataplane: no edge routes through a relay"),
    }
    write_json(
        &args.report,
        &EvaluateReport {
            convergence,
            propagation,
            bandwidth,
            failover,
            flapping,
            dataplane,
        },
    )
}

fn wan(args: &WanArgs) -> anyhow::Result<()> {
    // Validated before anything binds.
    let profile = LinkProfile::from_ms(args.rtt_ms, args.jitter_ms, args.loss)
        .context("--rtt-ms / --jitter-ms / --loss")?;
    let (tcp, udp) = match (args.tcp, args.udp) {
        (false, false) => (true, true),
        flags => flags,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let mut wan = Wan::new(args.seed);
        let mut listen = args.listen;
        if tcp {
            let link = wan
                .add_tcp("tcp", listen, args.target, profile, TcpOptions::default())
                .await?;
            // With port 0, UDP takes the port TCP got.
            listen = link.local_addr();
            println!("wan: tcp {} -> {}", link.local_addr(), args.target);
        }
        if udp {
            let link = wan
                .add_udp("udp", listen, args.target, profile, UdpOptions::default())
                .await?;
            println!("wan: udp {} -> {}", link.local_addr(), args.target);
        }
        println!(
            "wan: rtt {} ms, jitter ± {} ms, loss {}; Ctrl-C to stop",
            args.rtt_ms, args.jitter_ms, args.loss
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        for (name, link) in wan.links() {
            println!("wan: {name}: {:?}", link.handle().stats());
        }
        wan.shutdown().await;
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Routes(args) => routes(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Wan(args) => wan(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Demo(args) => run_cmd::demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A scenario or demo run that failed for another reason than its input.
        Err(err)
            if matches!(cli.command, Command::Run(_) | Command::Demo(_))
                && err.downcast_ref::<run_cmd::BadInput>().is_none() =>
        {
            eprintln!("simulate: {err:#}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("simulate: {err:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
