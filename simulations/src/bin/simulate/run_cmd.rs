//! `simulate run` and `simulate demo`: scenarios with real processes or in virtual time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use skylane_simulations::realnet::{self, Progress, RealnetError, RunOptions};
use skylane_simulations::report::{self, model::Report};
use skylane_simulations::scenario::{Plan, Scenario};
use skylane_simulations::{procs, virtual_run};
use tokio_util::sync::CancellationToken;

/// The demo's scenario (origin Frankfurt, six edges across Asia, Oceania, the Middle East
/// and the Americas).
const DEMO_SCENARIO: &str = include_str!("../../../scenarios/demo.toml");

/// Which engine runs the scenario.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// The real binaries on loopback behind the user-space WAN emulator (real time).
    Real,
    /// The virtual-time network (`vnet`) running the real routing core: route quality and
    /// failover, deterministic per seed, fast, scales to 100+ nodes.
    Virtual,
}

/// `simulate run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario file (TOML; see simulations/scenarios/default.toml).
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,
    /// Directory for report.md, report.json and the SVG charts.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Engine.
    #[arg(long, value_enum, default_value_t = Mode::Real)]
    mode: Mode,
    /// RTT matrix CSV instead of the scenario's (or the built-in 30-city one).
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    /// Virtual mode only: also run a synthetic mesh of this many nodes (random points on a
    /// sphere) with the scenario's routing, and time failovers at that scale.
    #[arg(long, value_name = "N")]
    synthetic_nodes: Option<usize>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// `simulate demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds in all, or as soon as the comparison is
    /// printed if measuring took longer (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Also write the full report here.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// RTT matrix CSV instead of the built-in 30-city one; name its regions with --origin
    /// and --edges.
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    /// Origin region instead of Frankfurt.
    #[arg(long, value_name = "NAME")]
    origin: Option<String>,
    /// Edge regions instead of the demo's six (comma-separated matrix names).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    edges: Option<Vec<String>>,
    /// Connectors beside the origin instead of the demo's two (1..=4); each edge sends new
    /// flows to the one its routing prefers.
    #[arg(long, value_name = "N")]
    connectors: Option<usize>,
    /// Samples per measurement and way.
    #[arg(long, default_value_t = 3)]
    samples: u32,
    /// Seconds given to routing before measuring.
    #[arg(long, default_value_t = 6.0)]
    warmup: f64,
}

/// An error that is the user's input (exit 64), as opposed to a failed run (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn machine() -> String {
    let uname = std::process::Command::new("uname")
        .arg("-srm")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{uname}, {cpus} CPUs")
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn command_line() -> String {
    let mut args = std::env::args();
    let _ = args.next();
    let rest: Vec<String> = args.collect();
    format!("simulate {}", rest.join(" "))
}

fn load_plan(path: &Path, matrix: Option<&Path>) -> anyhow::Result<Plan> {
    let source = path.display().to_string();
    Scenario::from_file(path)
        .and_then(|mut s| {
            if let Some(m) = matrix {
                s.matrix = Some(m.to_owned());
            }
            s.validate(&source)
        })
        .map_err(|e| BadInput(e.to_string()).into())
}

/// Cancelled on SIGINT or SIGTERM.
fn signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        cancel.cancel();
    });
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the simulate executable")?;
    let dir = exe.parent().context("simulate has no directory")?;
    procs::ensure_binaries(dir).context("finding mesh-node, origin-connector and demo-origin")
}

/// A scratch directory for one run, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let p = std::env::temp_dir().join(format!("skylane-simulate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("SKYLANE_KEEP_RUN_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn finish(mut report: Report, out: &Path) -> anyhow::Result<()> {
    report.command = command_line();
    report.machine = machine();
    let files = report::write(&report, out)
        .with_context(|| format!("writing the report to {}", out.display()))?;
    eprintln!("report written to {}: {}", out.display(), files.join(", "));
    Ok(())
}

/// `simulate run`.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let plan = load_plan(&args.scenario, args.matrix.as_deref())?;
    let progress = Progress::new(args.quiet);
    let started = utc_now();
    match args.mode {
        Mode::Virtual => {
            progress.say("virtual time: converging the mesh");
            let mut report = virtual_run::run(&plan, args.synthetic_nodes, &|m| progress.say(m))
                .map_err(|e| BadInput(e.to_string()))?;
            report.started_utc = started;
            print!("{}", virtual_run::summary_table(&report));
            finish(report, &args.out)
        }
        Mode::Real => {
            let bins = bin_dir()?;
            let scratch = Scratch::new()?;
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            let result = rt.block_on(async {
                let cancel = CancellationToken::new();
                signals(cancel.clone());
                let opts = RunOptions {
                    bin_dir: &bins,
                    work_dir: &scratch.0,
                    cancel,
                    keep: false,
                    time_purges: true,
                };
                realnet::run(&plan, opts, &progress).await
            });
            rt.shutdown_timeout(Duration::from_secs(2));
            let (mut report, _) = result.context("the run failed")?;
            report.started_utc = started;
            println!("{}", report::comparison_table(&report));
            finish(report, &args.out)
        }
    }
}

/// `simulate demo`.
pub fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let mut scenario =
        Scenario::parse(DEMO_SCENARIO, "demo.toml").map_err(|e| BadInput(e.to_string()))?;
    if let Some(m) = &args.matrix {
        scenario.matrix = Some(m.clone());
    }
    if let Some(origin) = &args.origin {
        scenario.origin = origin.clone();
    }
    if let Some(edges) = &args.edges {
        scenario.edges = edges.clone();
        scenario.client_regions = None;
    }
    if let Some(k) = args.connectors {
        scenario.connectors = k;
    }
    scenario.workload.samples = args.samples;
    scenario.warmup_s = args.warmup;
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        bail!(BadInput(format!(
            "--duration: {d} is not a positive number of seconds"
        )));
    }
    let plan = scenario
        .validate("demo.toml")
        .map_err(|e| BadInput(e.to_string()))?;
    let bins = bin_dir()?;
    // --duration counts from here: building the binaries (first run) is not part of it.
    let start = Instant::now();
    let scratch = Scratch::new()?;
    let progress = Progress::new(false);
    let started = utc_now();
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    let result: anyhow::Result<()> = rt.block_on(async {
        // Ctrl-C or SIGTERM stops everything at once; the deadline of --duration only ends
        // the serving phase, so a short demo on a slow machine still prints its table.
        let interrupt = CancellationToken::new();
        signals(interrupt.clone());
        let cancel = interrupt.child_token();
        if let Some(d) = args.duration {
            let deadline = start + Duration::from_secs_f64(d);
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline.into()).await;
                c.cancel();
            });
        }
        let opts = RunOptions {
            bin_dir: &bins,
            work_dir: &scratch.0,
            cancel: interrupt.clone(),
            keep: true,
            time_purges: false,
        };
        let (mut report, cluster) = match realnet::run(&plan, opts, &progress).await {
            Ok(r) => r,
            Err(RealnetError::Interrupted) => {
                eprintln!("simulate demo: stopped by a signal before the measurements finished");
                return Ok(());
            }
            Err(e) => return Err(e).context("the demo failed"),
        };
        report.started_utc = started.clone();
        println!("\nStraight to the origin in {} vs through the nearest edge (medians of {} samples, ms):\n", plan.scenario.origin, plan.scenario.workload.samples);
        println!("{}", report::comparison_table(&report));
        if let Some(out) = &args.out {
            finish(report, out)?;
        }
        if let Some(cluster) = cluster {
            println!("Open the chat page through a region's edge (its latency emulated). Trust the dev CA first:");
            println!("  CA: {}   (e.g. curl --cacert <CA> https://localhost:PORT/health)", cluster.ca_pem.display());
            for (c, door) in plan.clients.iter().zip(&cluster.doors) {
                println!(
                    "  {:<12} via edge {:<12} https://localhost:{}/   (straight to the origin: https://localhost:{}/)",
                    c.region,
                    plan.nodes[c.edge].region,
                    door.edge.port(),
                    door.origin.port()
                );
            }
            match args.duration {
                Some(d) => println!("Running until {d:.0} s have passed (or Ctrl-C)."),
                None => println!("Running until Ctrl-C."),
            }
            cancel.cancelled().await;
            eprintln!("stopping every process");
            cluster.shutdown(Duration::from_secs(2)).await;
        }
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(scratch);
    result
}
