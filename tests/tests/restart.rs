//! Restart without refusing connections: a new edge process started with `--take-over`
//! takes the running one's listening sockets and mesh socket, and the old one drains and
//! exits, while `wrk` opens a new connection for every request; and the same for a lone
//! connector, while `wrk` sends requests through the edge. Skipped, with the reason, where
//! `wrk` is not installed (scripts/setup-test-deps.sh installs it).

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use skylane_tests::{Cluster, ClusterOptions, Proc, bin};
use tokio_tungstenite::tungstenite::Message;

/// Whether wrk is missing, so the test is skipped (and says so).
fn skipped_without_wrk() -> bool {
    let have = std::process::Command::new("sh")
        .args(["-c", "command -v wrk"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("SKIPPED: the restart test needs wrk (scripts/setup-test-deps.sh installs it)");
    }
    !have
}

/// The counts wrk printed: requests, and every kind of error it counts.
#[derive(Debug, Default)]
struct WrkCounts {
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non_2xx: u64,
}

fn parse_wrk(out: &str) -> WrkCounts {
    let mut c = WrkCounts::default();
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.split(" requests in ").next()
            && line.contains(" requests in ")
        {
            c.requests = rest.trim().parse().unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n = n.parse().unwrap_or(0);
                match kind {
                    "connect" => c.connect = n,
                    "read" => c.read = n,
                    "write" => c.write = n,
                    "timeout" => c.timeout = n,
                    _ => {}
                }
            }
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            c.non_2xx = rest.trim().parse().unwrap_or(0);
        }
    }
    c
}

impl WrkCounts {
    /// Whether wrk made a fair number of requests and met no error of any kind: no
    /// connect, read, write or timeout error and no non-2xx answer.
    fn clean(&self) -> bool {
        self.requests > 100
            && self.connect == 0
            && self.read == 0
            && self.write == 0
            && self.timeout == 0
            && self.non_2xx == 0
    }
}

/// Starts wrk with `args` (threads, connections, duration, headers) on `url`.
fn start_wrk(args: &[&str], url: String) -> anyhow::Result<std::process::Child> {
    Ok(std::process::Command::new("wrk")
        .args(args)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// Waits for wrk to end: its counts, and its output.
async fn finish_wrk(wrk: std::process::Child) -> anyhow::Result<(WrkCounts, String)> {
    let out = tokio::task::spawn_blocking(move || wrk.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok((parse_wrk(&text), text))
}

/// Starts `binary --take-over --config config` beside the cluster's processes.
fn start_successor(
    c: &Cluster,
    name: &str,
    binary: &str,
    config: &std::path::Path,
) -> anyhow::Result<Proc> {
    Ok(Proc::spawn(
        name,
        &bin(binary),
        &[
            "--take-over",
            "--config",
            config.to_str().unwrap_or_default(),
        ],
        c.dir.path(),
    )?)
}

/// Sends one message at a time on `ws` until `old` exits, at most 20 s after `started`:
/// how many came back.
async fn echo_until_exit<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    old: &mut Proc,
    started: Instant,
) -> anyhow::Result<u32>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut echoed = 0;
    while old.wait_exit(Duration::from_millis(100)).is_none() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the old process did not exit"
        );
        let msg = Message::Text(format!("echo {echoed}").into());
        if ws.send(msg.clone()).await.is_ok()
            && let Ok(Some(Ok(back))) =
                tokio::time::timeout(Duration::from_secs(2), ws.next()).await
            && back == msg
        {
            echoed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(echoed)
}

/// Runs `restart` (which starts the successor) 2 s into 8 s of wrk with `wrk_args` on
/// edge 0, with a websocket open through the old process (`old` of the cluster): wrk's
/// output must show no failed request, and the websocket must echo on until the old
/// process exits. Returns the successor.
async fn restart_under_wrk(
    c: &mut Cluster,
    wrk_args: &[&str],
    old: impl Fn(&mut Cluster) -> &mut Proc,
    restart: impl FnOnce(&Cluster) -> anyhow::Result<Proc>,
) -> anyhow::Result<Proc> {
    let mut ws = skylane_tests::open_websocket(c, 0).await?;
    let url = format!("https://127.0.0.1:{}/api/time", c.edges[0].https.port());
    let wrk = start_wrk(wrk_args, url)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let successor = restart(&*c)?;
    // The old process drains once the successor serves; the websocket on it echoes until
    // then, its QUIC connection carried through the successor.
    let echoed = echo_until_exit(&mut ws, old(c), started)
        .await
        .map_err(|e| {
            anyhow::anyhow!("{e}\n{}\n--- successor ---\n{}", c.logs(), successor.log())
        })?;
    let lived = started.elapsed();
    let (counts, text) = finish_wrk(wrk).await?;
    println!(
        "the old process exited {lived:?} after the successor started; {echoed} websocket echoes meanwhile; wrk: {counts:?}"
    );
    anyhow::ensure!(
        counts.clean(),
        "{}\n--- successor ---\n{}\na request failed, or wrk made few, across the restart:\n{text}",
        c.logs(),
        successor.log()
    );
    // It kept echoing through the hand-over and the drain (the old process exits when the
    // grace time, 2 s here, is over).
    assert!(
        echoed >= 5,
        "the websocket on the old process echoed only {echoed} times"
    );
    assert!(
        successor
            .log()
            .contains("serving: the process taken over drains"),
        "{}",
        successor.log()
    );
    Ok(successor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_refuses_no_connection() -> anyhow::Result<()> {
    if skipped_without_wrk() {
        return Ok(());
    }
    // One client address opens every connection here: lift the per-address accept rate.
    let mut c = Cluster::start(ClusterOptions {
        edge_config:
            "[limits]\nnew_connections_per_ip_per_s = 100000.0\nnew_connections_burst = 100000\n"
                .into(),
        ..ClusterOptions::default()
    })?;
    // wrk opens a new connection for every request.
    let mut successor = restart_under_wrk(
        &mut c,
        &["-t2", "-c16", "-d8s", "-H", "Connection: close"],
        |c| &mut c.edges[0].proc,
        |c| start_successor(c, "edge-0-successor", "mesh-node", &c.edges[0].config),
    )
    .await?;
    // The successor serves on its own.
    let client = c.client(0)?;
    assert_eq!(
        client.get(c.url(0, "/api/time")).send().await?.status(),
        200
    );
    // Neither process lost its tunnel: both read the one mesh socket during the hand-over,
    // and a packet read by the process it is not for would be answered with a stateless
    // reset (one reset key per node) that ends the other's connection.
    for (name, log) in [
        ("old", c.edges[0].proc.log()),
        ("successor", successor.log()),
    ] {
        assert!(
            !log.contains("tunnel down"),
            "the {name} process lost a tunnel during the hand-over:\n{log}"
        );
    }
    successor.kill();
    Ok(())
}

/// A lone connector restarted with `--take-over` under load: the old process hands its
/// mesh socket to the new one, refuses new streams as "restarting", and the edge opens a
/// new tunnel connection for them, which reaches the new process. No request fails, and a
/// websocket on the old process echoes until its drain ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_connector_restarts_without_a_failed_request() -> anyhow::Result<()> {
    if skipped_without_wrk() {
        return Ok(());
    }
    // Three shards: the edge keeps a tunnel connection per shard, all to the old process,
    // and every one must be given up for the new, not one refusal at a time.
    let mut c = Cluster::start(ClusterOptions {
        worker_threads: Some(3),
        ..ClusterOptions::default()
    })?;
    let mut successor = restart_under_wrk(
        &mut c,
        &["-t2", "-c8", "-d8s"],
        |c| &mut c.connector,
        |c| {
            start_successor(
                c,
                "connector-successor",
                "origin-connector",
                &c.connector_config,
            )
        },
    )
    .await?;
    let edge_log = c.edges[0].proc.log();
    let retired: Vec<&str> = edge_log
        .lines()
        .filter(|l| l.contains("hands over to a successor process"))
        .collect();
    println!("the edge retired connections: {retired:?}");
    assert!(
        !retired.is_empty(),
        "the edge never heard that the old connector handed over\n{}",
        c.logs()
    );
    // The successor serves on its own: requests and a new websocket.
    let client = c.client(0)?;
    assert_eq!(
        client.get(c.url(0, "/api/time")).send().await?.status(),
        200
    );
    let mut fresh = skylane_tests::open_websocket(&c, 0).await?;
    skylane_tests::websocket_echo(&mut fresh, "after").await?;
    successor.kill();
    Ok(())
}
