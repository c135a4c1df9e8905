//! Restart without refusing connections: a new edge process started with `--take-over`
//! takes the running one's listening sockets and mesh socket, and the old one drains and
//! exits, while `wrk` opens a new connection for every request; and the same for a lone
//! connector, while `wrk` sends requests through the edge. Skipped, with the reason, where
//! `wrk` is not installed (scripts/setup-test-deps.sh installs it).

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use skylane_tests::{Cluster, ClusterOptions, Proc, bin};
use tokio_tungstenite::tungstenite::Message;

fn have_wrk() -> bool {
    std::process::Command::new("sh")
        .args(["-c", "command -v wrk"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_refuses_no_connection() -> anyhow::Result<()> {
    if !have_wrk() {
        eprintln!("SKIPPED: the restart test needs wrk (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    }
    // One client address opens every connection here: lift the per-address accept rate.
    let mut c = Cluster::start(ClusterOptions {
        edge_config:
            "[limits]\nnew_connections_per_ip_per_s = 100000.0\nnew_connections_burst = 100000\n"
                .into(),
        ..ClusterOptions::default()
    })?;
    let https = c.edges[0].https;
    // A websocket on the old process: it keeps echoing while the old process drains.
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"http/1.1"]).await?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", https.port()), stream)
            .await?;
    // wrk, every request on a new connection, for 8 s.
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c16", "-d8s", "-H", "Connection: close"])
        .arg(format!("https://127.0.0.1:{}/api/time", https.port()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let config = c.edges[0].config.clone();
    let mut successor = Proc::spawn(
        "edge-0-successor",
        &bin("mesh-node"),
        &[
            "--take-over",
            "--config",
            config.to_str().unwrap_or_default(),
        ],
        c.dir.path(),
    )?;
    // The old process drains once the successor serves; the websocket on it echoes until
    // then, its QUIC connection carried through the successor.
    let mut echoed = 0;
    while c.edges[0]
        .proc
        .wait_exit(Duration::from_millis(100))
        .is_none()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the old process did not exit\n{}\n--- successor ---\n{}",
            c.logs(),
            successor.log()
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
    let exited = started.elapsed();
    let out = tokio::task::spawn_blocking(move || wrk.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let counts = parse_wrk(&text);
    println!(
        "old process exited {exited:?} after the successor started; {echoed} websocket echoes meanwhile; wrk: {counts:?}"
    );
    anyhow::ensure!(counts.requests > 100, "wrk made few requests:\n{text}");
    anyhow::ensure!(
        counts.connect == 0
            && counts.read == 0
            && counts.write == 0
            && counts.timeout == 0
            && counts.non_2xx == 0,
        "{}\n--- successor ---\n{}\na connection was refused or failed across the restart:\n{text}",
        c.logs(),
        successor.log()
    );
    // It kept echoing through the hand-over and the drain (the old process exits when the
    // grace time, 2 s here, is over).
    assert!(
        echoed >= 5,
        "the websocket on the old process echoed only {echoed} times"
    );
    // The successor serves on its own.
    let client = c.client(0)?;
    assert_eq!(
        client.get(c.url(0, "/api/time")).send().await?.status(),
        200
    );
    assert!(
        successor
            .log()
            .contains("serving: the process taken over drains"),
        "{}",
        successor.log()
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
    if !have_wrk() {
        eprintln!("SKIPPED: the restart test needs wrk (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    }
    // Three shards: the edge keeps a tunnel connection per shard, all to the old process,
    // and every one must be given up for the new, not one refusal at a time.
    let mut c = Cluster::start(ClusterOptions {
        worker_threads: Some(3),
        ..ClusterOptions::default()
    })?;
    let https = c.edges[0].https;
    let stream = skylane_tests::tls_to_edge(&c, 0, &[b"http/1.1"]).await?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", https.port()), stream)
            .await?;
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c8", "-d8s"])
        .arg(format!("https://127.0.0.1:{}/api/time", https.port()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let config = c.connector_config.clone();
    let mut successor = Proc::spawn(
        "connector-successor",
        &bin("origin-connector"),
        &[
            "--take-over",
            "--config",
            config.to_str().unwrap_or_default(),
        ],
        c.dir.path(),
    )?;
    // The websocket went through the old process: it echoes through the hand-over and the
    // drain (its QUIC connection carried through the successor), until the old one exits.
    let mut echoed = 0;
    while c.connector.wait_exit(Duration::from_millis(100)).is_none() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the old connector did not exit\n{}\n--- successor ---\n{}",
            c.logs(),
            successor.log()
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
    let exited = started.elapsed();
    let out = tokio::task::spawn_blocking(move || wrk.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let counts = parse_wrk(&text);
    println!(
        "old connector exited {exited:?} after the successor started; {echoed} websocket echoes meanwhile; wrk: {counts:?}"
    );
    anyhow::ensure!(counts.requests > 100, "wrk made few requests:\n{text}");
    anyhow::ensure!(
        counts.connect == 0
            && counts.read == 0
            && counts.write == 0
            && counts.timeout == 0
            && counts.non_2xx == 0,
        "{}\n--- successor ---\n{}\na request failed across the connector's restart:\n{text}",
        c.logs(),
        successor.log()
    );
    assert!(
        echoed >= 5,
        "the websocket on the old connector echoed only {echoed} times"
    );
    assert!(
        successor
            .log()
            .contains("serving: the process taken over drains"),
        "{}",
        successor.log()
    );
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
