//! ACME against a real CA: Let's Encrypt's test server Pebble (Debian's `pebble`, installed by
//! `scripts/setup-test-deps.sh`), with `pebble-challtestsrv` answering its DNS so every
//! name points at 127.0.0.1. Two edges each order a certificate for `chat.test`; Pebble's
//! validator is pointed at the *second* edge's port only, so the first edge's order is
//! proven by an answer the second edge gives from the mesh bulletin — as when DNS sends the
//! CA to another edge. The certificates are then renewed (renew_before_days is longer than
//! Pebble's certificates live) without a restart, and survive one.
//!
//! Without `pebble` on PATH the tests say so and pass without running: CI installs it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skylane_tests::{Cluster, ClusterOptions, Proc, TempDir, bin, free_tcp, free_udp, status};

const NAME: &str = "chat.test";

fn have_pebble() -> bool {
    ["pebble", "pebble-challtestsrv"].iter().all(|b| {
        Command::new("which")
            .arg(b)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Pebble and its DNS, stopped when dropped.
struct Ca {
    _dns: Proc,
    _pebble: Proc,
    management: SocketAddr,
    /// The dev CA that signed Pebble's own HTTPS certificate.
    api_ca: PathBuf,
}

/// A port for Pebble, held bound until Pebble starts. The cluster starts between the
/// choice and Pebble's start, and a port merely chosen free could be handed to one of its
/// processes meanwhile: the ACME client then spoke TLS to a plain-HTTP listener ("received
/// corrupt message of type InvalidContentType"), a failure seen once in CI.
fn reserve_port() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port for pebble")
}

/// Starts Pebble on the port `held` (released here, just before), validating HTTP-01 on
/// `http_port` and TLS-ALPN-01 on `tls_port` of 127.0.0.1.
fn start_ca(
    dir: &Path,
    held: std::net::TcpListener,
    http_port: u16,
    tls_port: u16,
) -> anyhow::Result<Ca> {
    let listen = held.local_addr()?;
    let certs = dir.join("pebble-certs");
    let made = Command::new(bin("mesh-node"))
        .args(["dev-cert", "--out-dir"])
        .arg(&certs)
        .args(["--name", "127.0.0.1", "--name", "localhost"])
        .output()?;
    anyhow::ensure!(made.status.success(), "dev-cert failed");
    let dns = free_udp();
    let management = free_tcp();
    let config = dir.join("pebble.json");
    std::fs::write(
        &config,
        serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": certs.join("edge.pem"),
            "privateKey": certs.join("edge.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }})
        .to_string(),
    )?;
    let dns_proc = Proc::spawn(
        "challtestsrv",
        Path::new("pebble-challtestsrv"),
        &[
            "-dns01",
            &dns.to_string(),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &free_tcp().to_string(),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ],
        dir,
    )?;
    // No sleeps in validation, no refused nonces, and a fresh authorization every order, so
    // a renewal is validated again.
    drop(held);
    let mut pebble = Proc::spawn_with_env(
        "pebble",
        Path::new("pebble"),
        &[
            "-config",
            config.to_str().unwrap_or_default(),
            "-dnsserver",
            &dns.to_string(),
        ],
        dir,
        &[
            ("PEBBLE_VA_NOSLEEP", "1"),
            ("PEBBLE_WFE_NONCEREJECT", "0"),
            ("PEBBLE_AUTHZREUSE", "0"),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(listen).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "pebble did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Whoever answers must be Pebble: one that lost its port to another process exits.
    std::thread::sleep(Duration::from_millis(200));
    anyhow::ensure!(
        pebble.is_running(),
        "pebble exited at start:\n{}",
        pebble.log()
    );
    Ok(Ca {
        _dns: dns_proc,
        _pebble: pebble,
        management,
        api_ca: certs.join("ca.pem"),
    })
}

/// The `[acme]` section of edge `i`.
fn acme_section(directory: &str, api_ca: &Path, i: usize, challenge: &str) -> String {
    format!(
        "[acme]\ndirectory_url = \"{directory}\"\nnames = [\"{NAME}\"]\nstate_dir = \"acme-{i}\"\n\
         contact = [\"mailto:ops@chat.test\"]\nterms_of_service_agreed = true\nchallenge = \"{challenge}\"\n\
         renew_before_days = 3650\ncheck_interval_s = 2\nca_file = \"{}\"\n",
        api_ca.display()
    )
}

/// Edge `i`'s certificates issued so far, from `/status`.
fn issued(c: &Cluster, i: usize) -> u64 {
    status(c.edges[i].admin)
        .and_then(|s| s["acme"][0]["issued"].as_u64())
        .unwrap_or(0)
}

fn wait_issued(c: &Cluster, at_least: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..c.edges.len() {
        while issued(c, i) < at_least {
            anyhow::ensure!(
                Instant::now() < deadline,
                "edge-{i} has {} ACME certificates, not {at_least}; its status: {:?}\n{}",
                issued(c, i),
                status(c.edges[i].admin).map(|s| s["acme"].clone()),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Pebble's root (it makes a new one at every start), from its management API.
async fn pebble_root(ca: &Ca) -> anyhow::Result<reqwest::Certificate> {
    let api = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca.api_ca)?)?)
        .build()?;
    let pem = api
        .get(format!("https://{}/roots/0", ca.management))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(reqwest::Certificate::from_pem(&pem)?)
}

/// `GET https://chat.test/health` at `edge`, trusting only Pebble's root.
async fn get_with_acme_cert(root: &reqwest::Certificate, edge: SocketAddr) -> anyhow::Result<u16> {
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root.clone())
        .resolve(NAME, edge)
        .build()?;
    let r = client
        .get(format!("https://{NAME}:{}/health", edge.port()))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

fn cluster(each: Vec<String>) -> anyhow::Result<Cluster> {
    Cluster::start(ClusterOptions {
        edges: 2,
        edge_config_each: each,
        ..ClusterOptions::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificates_proven_through_another_edge_renewed_and_kept() -> anyhow::Result<()> {
    if !have_pebble() {
        eprintln!("SKIPPED: no pebble on PATH (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    }
    let dir = TempDir::new("pebble");
    let listen = reserve_port();
    let http: Vec<SocketAddr> = (0..2).map(|_| free_tcp()).collect();
    let api_ca = dir.path().join("pebble-certs/ca.pem");
    let directory = format!("https://{}/dir", listen.local_addr()?);
    let mut c = cluster(
        (0..2)
            .map(|i| {
                format!(
                    "[http]\nlisten = \"{}\"\n\n{}",
                    http[i],
                    acme_section(&directory, &api_ca, i, "http-01")
                )
            })
            .collect(),
    )?;
    // Every validation goes to edge-1's port 80 stand-in; edge-0's order too.
    let ca = start_ca(dir.path(), listen, http[1].port(), 1)?;
    wait_issued(&c, 1)?;
    let root = pebble_root(&ca).await?;
    for edge in &c.edges {
        assert_eq!(get_with_acme_cert(&root, edge.https).await?, 200);
    }
    assert!(
        c.edges[1].proc.log().contains("ACME certificate obtained")
            && c.edges[0].proc.log().contains("ACME certificate obtained")
    );

    // Renewal ahead of expiry, without a restart: the next certificate comes and serves.
    wait_issued(&c, 2)?;
    assert_eq!(get_with_acme_cert(&root, c.edges[0].https).await?, 200);

    // Kept on disk: a restarted edge serves its certificate at once, before any order.
    c.restart_edge(0)?;
    assert!(
        c.edges[0]
            .proc
            .log()
            .contains("ACME certificate loaded from disk")
    );
    assert_eq!(get_with_acme_cert(&root, c.edges[0].https).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_certificates_proven_through_another_edge() -> anyhow::Result<()> {
    if !have_pebble() {
        eprintln!("SKIPPED: no pebble on PATH (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    }
    let dir = TempDir::new("pebble-alpn");
    let listen = reserve_port();
    let api_ca = dir.path().join("pebble-certs/ca.pem");
    let directory = format!("https://{}/dir", listen.local_addr()?);
    let c = cluster(
        (0..2)
            .map(|i| acme_section(&directory, &api_ca, i, "tls-alpn-01"))
            .collect(),
    )?;
    // Pebble validates on edge-1's HTTPS port, for both edges' orders.
    let ca = start_ca(dir.path(), listen, 1, c.edges[1].https.port())?;
    wait_issued(&c, 1)?;
    let root = pebble_root(&ca).await?;
    for edge in &c.edges {
        assert_eq!(get_with_acme_cert(&root, edge.https).await?, 200);
    }
    // Ordinary clients still get the edge's configured certificate for other names.
    let dev = c.client(0)?;
    assert_eq!(dev.get(c.url(0, "/health")).send().await?.status(), 200);
    Ok(())
}
