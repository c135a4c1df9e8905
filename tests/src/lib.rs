//! Harness for end-to-end tests: builds the real binaries once, starts them on loopback
//! with generated keys, certificates and configs, and stops them when dropped.
//!
//! Tests use real clients (reqwest over TLS, hyper's HTTP/2 client, tokio-tungstenite),
//! never in-process shortcuts, so what passes here is what an operator runs.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use skylane_shared::identity::NodeKey;

pub mod browser;
pub mod h2raw;
pub mod netns;
pub mod wireguard;

/// Directory holding the built binaries (`target/debug`), building them on first use.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // A test executable lives in target/<profile>/deps, a tool (the benchmarks in
        // src/bin) in target/<profile>.
        let exe = std::env::current_exe().expect("test executable path");
        let parent = exe.parent().expect("executable directory");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target directory").to_owned()
        } else {
            parent.to_owned()
        };
        // The same build as `simulate` does (one feature set, the same environment), so
        // the two never make cargo rebuild the binaries for each other.
        skylane_simulations::procs::ensure_binaries(&dir).expect("building the binaries")
    })
}

/// Path of one binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `skylane-<tag>-<pid>-<n>` under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("skylane-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use skylane_simulations::procs::{Proc, http_get, http_get_status, status};

/// Makes `socket`'s node known to `peer` the way a real node's first SWIM datagram does:
/// a node learns a member's address only from an authenticated frame, never from a QUIC
/// packet (which anyone can forge). Tests that play a member without running its control
/// loop call this before they dial.
///
/// A socket bound a moment ago may not be writable yet in the reactor's eyes (the send is
/// a non-blocking `try_send_to`): that is retried, for up to a second.
pub async fn introduce(
    socket: &skylane_shared::mesh::MeshSocket,
    peer: &skylane_shared::identity::NodeId,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        match socket.send_control(
            &peer.short(),
            skylane_shared::mesh::BodyType::Swim,
            b"hello",
        ) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return Ok(other?),
        }
    }
    bail!("the socket never became writable")
}

/// Whether `proc` exited at start because a port it was given was taken meanwhile: a port
/// from [`free_tcp`] is free when chosen, and another test may bind it before the node
/// does. `false` once its admin listener answers (every listener is bound by then), or
/// when it failed for another reason (the caller's readiness wait reports that).
fn lost_a_port(proc: &mut Proc, admin: SocketAddr) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if http_get_status(admin, "/healthz").is_some() {
            return false;
        }
        if !proc.is_running() {
            return proc.log().contains("Address already in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A free TCP port on 127.0.0.1 (bound then released; fine for tests).
pub fn free_tcp() -> SocketAddr {
    skylane_simulations::procs::free_tcp().expect("free tcp port")
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp() -> SocketAddr {
    skylane_simulations::procs::free_udp().expect("free udp port")
}

/// A running demo-origin.
#[derive(Debug)]
pub struct Origin {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts demo-origin on `listen` (port 0 picks one) and waits for its banner.
pub fn start_origin(listen: &str, name: &str, dir: &Path) -> anyhow::Result<Origin> {
    let log = dir.join(format!("origin-{name}.log"));
    let mut child = Command::new(bin("demo-origin"))
        .args(["--listen", listen, "--name", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting demo-origin")?;
    let stdout = child.stdout.take().context("demo-origin stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("unexpected demo-origin banner {line:?}"))?;
    Ok(Origin {
        proc: Proc::from_child(&format!("origin-{name}"), child, log),
        addr,
    })
}

/// Options for [`Cluster::start`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many edges.
    pub edges: usize,
    /// Health-check interval for the web service.
    pub health_interval_ms: u64,
    /// Origin response timeout.
    pub response_timeout_ms: u64,
    /// The connector's mesh UDP address, when the test chooses it (to point a WAN link at
    /// it before the cluster starts).
    pub connector_udp: Option<SocketAddr>,
    /// Per edge, where it dials the connector (a WAN link in front of it, say); missing or
    /// `None`: the connector's own address.
    pub connector_addr_for_edge: Vec<Option<SocketAddr>>,
    /// TOML appended to every node's config (a `[routing]` section, say).
    pub extra_config: String,
    /// `node.worker_threads` of the connector and every edge; `None`: the default.
    pub worker_threads: Option<usize>,
    /// TOML appended to every edge's config only (`[limits]`, `[timeouts]`…).
    pub edge_config: String,
    /// TOML appended to one edge's config: entry `i` to edge `i` (an `[http]` listener on
    /// a port the test chose, an `[acme]` section with its own state directory).
    pub edge_config_each: Vec<String>,
    /// The edges' `[[routes]]` instead of the default ones (`*` → `web`, and a route to a
    /// service the connector does not know under `/unknown-service`).
    pub routes: Option<String>,
    /// Lines added to the edges' `[tunnel]` section (`streams_per_connection = 10`).
    pub tunnel_config: String,
    /// Lines added to the connector's `[services.web]` section.
    pub web_service_config: String,
    /// Write a shared `[under_attack]` secret to `keys/challenge.secret` (edges' configs
    /// name it in `edge_config`).
    pub challenge_secret: bool,
    /// A second connector, `connector-b`, beside the same origin (redundant connectors).
    pub second_connector: bool,
    /// The connector's `transport` (`quic` by default, or `wireguard`).
    pub connector_transport: &'static str,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            edges: 1,
            health_interval_ms: 200,
            response_timeout_ms: 5_000,
            connector_udp: None,
            connector_addr_for_edge: Vec::new(),
            extra_config: String::new(),
            worker_threads: None,
            edge_config: String::new(),
            edge_config_each: Vec::new(),
            routes: None,
            challenge_secret: false,
            second_connector: false,
            tunnel_config: String::new(),
            web_service_config: String::new(),
            connector_transport: "quic",
        }
    }
}

/// One running edge.
#[derive(Debug)]
pub struct Edge {
    /// The process.
    pub proc: Proc,
    /// HTTPS listener.
    pub https: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Raw TCP listener mapped to the `echo-tcp` service.
    pub tcp: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its mesh UDP address.
    pub udp: SocketAddr,
}

/// demo-origin + connector + edges on loopback, with everything they need on disk.
#[derive(Debug)]
pub struct Cluster {
    /// Keys, certificates, configs and logs.
    pub dir: TempDir,
    /// The origin.
    pub origin: Origin,
    /// The connector process.
    pub connector: Proc,
    /// The connector's config file (to restart it).
    pub connector_config: PathBuf,
    /// The connector's mesh UDP address.
    pub connector_udp: SocketAddr,
    /// The connector's admin listener.
    pub connector_admin: SocketAddr,
    /// The edges.
    pub edges: Vec<Edge>,
    /// The dev CA that signed the edges' certificate.
    pub ca_pem: PathBuf,
    /// A member key the test can use to act as an extra edge (`edge-test`).
    pub spare_member_key: NodeKey,
    /// The second connector, `connector-b`, if asked for.
    pub second: Option<SecondConnector>,
}

/// The second connector of a cluster.
#[derive(Debug)]
pub struct SecondConnector {
    /// The process.
    pub proc: Proc,
    /// Its admin listener.
    pub admin: SocketAddr,
}

fn member_block(name: &str, role: &str, key_file: &str, address: Option<SocketAddr>) -> String {
    let addr = address
        .map(|a| format!("address = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        "[[mesh.members]]\nname = \"{name}\"\nrole = \"{role}\"\npublic_key_file = \"{key_file}\"\n{addr}\n"
    )
}

impl Cluster {
    /// Starts the whole thing and waits until every edge's tunnel is up.
    pub fn start(opts: ClusterOptions) -> anyhow::Result<Self> {
        let dir = TempDir::new("cluster");
        let d = dir.path();
        let origin = start_origin("127.0.0.1:0", "origin-1", d)?;
        let status = Command::new(bin("mesh-node"))
            .args(["dev-cert", "--out-dir"])
            .arg(d.join("certs"))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("mesh-node dev-cert failed");
        }
        let mut names = vec!["connector".to_string(), "edge-test".to_string()];
        names.extend((0..opts.edges).map(|i| format!("edge-{i}")));
        if opts.second_connector {
            names.push("connector-b".into());
        }
        let mut spare = None;
        for n in &names {
            let key = NodeKey::generate()?;
            key.save(&d.join(format!("keys/{n}.key")))?;
            if n == "edge-test" {
                spare = Some(key);
            }
        }
        if opts.challenge_secret {
            std::fs::write(
                d.join("keys/challenge.secret"),
                "test-secret-0123456789-0123456789-abcdef",
            )?;
        }
        let routes = opts.routes.clone().unwrap_or_else(|| {
            "[[routes]]\nhost = \"*\"\nservice = \"web\"\n\n\
             [[routes]]\nhost = \"*\"\npath_prefix = \"/unknown-service\"\nservice = \"no-such-service\"\n"
                .to_owned()
        });
        let edge_extra = &opts.edge_config;
        let tunnel_extra = &opts.tunnel_config;
        let connector_udp = opts.connector_udp.unwrap_or_else(free_udp);
        let second_udp = free_udp();
        let edge_udp: Vec<SocketAddr> = (0..opts.edges).map(|_| free_udp()).collect();
        // Every member but the connector, with edges' addresses so they can relay for
        // each other.
        let mut others = String::new();
        for n in names.iter().skip(1) {
            let address = n
                .strip_prefix("edge-")
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| edge_udp.get(i).copied());
            let (role, address) = if n == "connector-b" {
                ("connector", Some(second_udp))
            } else {
                ("edge", address)
            };
            others.push_str(&member_block(
                n,
                role,
                &format!("keys/{n}.key.pub"),
                address,
            ));
        }
        let transport = opts.connector_transport;
        let members_with = |connector_addr: SocketAddr| {
            member_block(
                "connector",
                "connector",
                "keys/connector.key.pub",
                Some(connector_addr),
            )
            .replacen("\n\n", &format!("\ntransport = \"{transport}\"\n\n"), 1)
                + &others
        };
        let members = members_with(connector_udp);
        let extra = &opts.extra_config;
        let threads = opts
            .worker_threads
            .map(|n| format!("worker_threads = {n}\n"))
            .unwrap_or_default();
        // A connector named `name` on `udp`, its admin port chosen afresh if another test
        // took it first.
        let spawn_connector = |name: &str,
                               udp: SocketAddr|
         -> anyhow::Result<(Proc, SocketAddr, PathBuf)> {
            let config = d.join(format!("{name}.toml"));
            let mut attempt = 0;
            loop {
                let admin = free_tcp();
                std::fs::write(
                    &config,
                    format!(
                        "shutdown_grace_ms = 2000\n\n[node]\nname = \"{name}\"\nkey_file = \"keys/{name}.key\"\nlisten = \"{udp}\"\n{threads}\n\
                     {members}[admin]\nlisten = \"{admin}\"\n\n\
                     [services.web]\nservers = [\"{origin}\"]\nresponse_timeout_ms = {rt}\n{web}\n\n\
                     [services.web.health_check]\npath = \"/health\"\ninterval_ms = {hi}\ntimeout_ms = 500\nhealthy_threshold = 1\nunhealthy_threshold = 2\n\n\
                     [services.echo-tcp]\nkind = \"tcp\"\nservers = [\"{origin}\"]\n\n{extra}\n",
                        origin = origin.addr,
                        rt = opts.response_timeout_ms,
                        web = opts.web_service_config,
                        hi = opts.health_interval_ms,
                    ),
                )?;
                let mut proc = Proc::spawn(
                    name,
                    &bin("origin-connector"),
                    &["--config", path_str(&config)?],
                    d,
                )?;
                if attempt < 4 && lost_a_port(&mut proc, admin) {
                    attempt += 1;
                    continue;
                }
                return Ok((proc, admin, config));
            }
        };
        let (connector, connector_admin, connector_config) =
            spawn_connector("connector", connector_udp)?;
        let second = if opts.second_connector {
            let (proc, admin, _) = spawn_connector("connector-b", second_udp)?;
            Some(SecondConnector { proc, admin })
        } else {
            None
        };
        let mut edges = Vec::new();
        for (i, &udp) in edge_udp.iter().enumerate() {
            let mut attempt = 0;
            let config = d.join(format!("edge-{i}.toml"));
            let (proc, https, admin, tcp) = loop {
                let (https, admin, tcp) = (free_tcp(), free_tcp(), free_tcp());
                let members = members_with(
                    opts.connector_addr_for_edge
                        .get(i)
                        .copied()
                        .flatten()
                        .unwrap_or(connector_udp),
                );
                let own = opts.edge_config_each.get(i).map_or("", String::as_str);
                std::fs::write(
                    &config,
                    format!(
                        "shutdown_grace_ms = 2000\n\n[node]\nname = \"edge-{i}\"\nkey_file = \"keys/edge-{i}.key\"\nlisten = \"{udp}\"\n{threads}\n\
                     {members}[https]\nlisten = \"{https}\"\n\n[[https.certificates]]\ncert_file = \"certs/edge.pem\"\nkey_file = \"certs/edge.key\"\nserver_names = [\"localhost\"]\n\n\
                     {routes}\n\
                     [[tcp]]\nlisten = \"{tcp}\"\nservice = \"echo-tcp\"\n\n\
                     [admin]\nlisten = \"{admin}\"\n\n[tunnel]\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n{tunnel_extra}\n\n{extra}\n{edge_extra}\n{own}\n"
                    ),
                )?;
                // SKYLANE_EDGE_WRAPPER="valgrind --tool=massif" (say) runs the edges under a
                // profiler, and SKYLANE_EDGE_BIN another build of mesh-node (one with the
                // system allocator, for massif), for the benchmarks' "where do the bytes go".
                let mesh_node = std::env::var_os("SKYLANE_EDGE_BIN")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| bin("mesh-node"));
                let wrapper = std::env::var("SKYLANE_EDGE_WRAPPER").unwrap_or_default();
                let mut argv: Vec<&str> = wrapper.split_whitespace().collect();
                let program = match argv.first() {
                    Some(p) => PathBuf::from(p),
                    None => mesh_node.clone(),
                };
                if !argv.is_empty() {
                    argv.remove(0);
                    argv.push(path_str(&mesh_node)?);
                }
                argv.extend(["--config", path_str(&config)?]);
                let mut proc = Proc::spawn(&format!("edge-{i}"), &program, &argv, d)?;
                if attempt < 4 && lost_a_port(&mut proc, admin) {
                    attempt += 1;
                    continue;
                }
                break (proc, https, admin, tcp);
            };
            edges.push(Edge {
                proc,
                https,
                admin,
                tcp,
                config,
                udp,
            });
        }
        let cluster = Self {
            ca_pem: d.join("certs/ca.pem"),
            dir,
            origin,
            connector,
            connector_config,
            connector_udp,
            connector_admin,
            edges,
            spare_member_key: spare.context("spare key")?,
            second,
        };
        for e in &cluster.edges {
            wait_ready(e.admin, Duration::from_secs(15)).with_context(|| {
                format!(
                    "edge never became ready; log:\n{}\nconnector log:\n{}",
                    e.proc.log(),
                    cluster.connector.log()
                )
            })?;
        }
        Ok(cluster)
    }

    /// Restarts the connector with the same config (same key and port).
    pub fn restart_connector(&mut self) -> anyhow::Result<()> {
        self.connector.kill();
        self.start_connector()
    }

    /// Stops the connector as an operator does (SIGTERM, waiting up to 10 s for it to
    /// exit; then SIGKILL).
    pub fn stop_connector(&mut self) {
        self.connector.terminate();
        if self.connector.wait_exit(Duration::from_secs(10)).is_none() {
            self.connector.kill();
        }
    }

    /// Starts the connector again with the same config (after [`Cluster::stop_connector`]);
    /// does not wait for it.
    pub fn start_connector(&mut self) -> anyhow::Result<()> {
        self.connector = Proc::spawn(
            "connector",
            &bin("origin-connector"),
            &["--config", path_str(&self.connector_config)?],
            self.dir.path(),
        )?;
        Ok(())
    }

    /// Stops edge `i` (SIGTERM, waiting for it to exit) and starts it again with the same
    /// config, waiting until it is ready.
    pub fn restart_edge(&mut self, i: usize) -> anyhow::Result<()> {
        let e = &mut self.edges[i];
        e.proc.terminate();
        if e.proc.wait_exit(Duration::from_secs(10)).is_none() {
            e.proc.kill();
        }
        e.proc = Proc::spawn(
            &format!("edge-{i}"),
            &bin("mesh-node"),
            &["--config", path_str(&e.config)?],
            self.dir.path(),
        )?;
        wait_ready(e.admin, Duration::from_secs(15))
    }

    /// An HTTPS client that trusts the dev CA and sends `localhost` to edge `i`.
    pub fn client(&self, i: usize) -> anyhow::Result<reqwest::Client> {
        https_client(&self.ca_pem, self.edges[i].https)
    }

    /// `https://localhost:PORT` of edge `i`.
    pub fn url(&self, i: usize, path: &str) -> String {
        format!("https://localhost:{}{path}", self.edges[i].https.port())
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- connector ---\n{}\n", self.connector.log());
        for e in &self.edges {
            s.push_str(&format!("--- {} ---\n{}\n", e.proc.name, e.proc.log()));
        }
        s
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// An HTTPS client trusting `ca_pem`, with `localhost` pinned to `addr`.
pub fn https_client(ca_pem: &Path, addr: SocketAddr) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_pem)?)?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(120))
        .build()?)
}

/// A rustls client config trusting `ca_pem`, with the given ALPN protocols.
pub fn tls_config(ca_pem: &Path, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Polls `http://admin/readyz` until it answers 200.
pub fn wait_ready(admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    if skylane_simulations::procs::wait_ready(admin, timeout) {
        Ok(())
    } else {
        bail!("{admin}/readyz not ready after {timeout:?}")
    }
}

/// A TLS connection to edge `i` of `cluster`, for `localhost`, offering `alpn`.
pub async fn tls_to_edge(
    cluster: &Cluster,
    i: usize,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = tls_config(&cluster.ca_pem, alpn)?;
    let tcp = tokio::net::TcpStream::connect(cluster.edges[i].https).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?)
}

/// A websocket to the demo origin's echo (`/ws`) through edge `i`, over HTTP/1.1.
pub async fn open_websocket(
    cluster: &Cluster,
    i: usize,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
> {
    let stream = tls_to_edge(cluster, i, &[b"http/1.1"]).await?;
    let url = format!("wss://localhost:{}/ws", cluster.edges[i].https.port());
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// Sends `text` and waits (at most 5 s) for the same text back, skipping pings and pongs.
pub async fn websocket_echo<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    text: &str,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(text.into())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Text(t))) => {
                anyhow::ensure!(t.as_str() == text, "echo {t:?}, not {text:?}");
                return Ok(());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => anyhow::bail!("the websocket did not echo {text:?}: {other:?}"),
        }
    }
}

/// `POST path` with a JSON `body` to an admin listener; the status code.
pub fn admin_post(admin: SocketAddr, path: &str, body: &str) -> anyhow::Result<u16> {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "POST {path} HTTP/1.0\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    tcp.read_to_string(&mut out)?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// The path (node names) a node's route to `destination` takes now, from its `/status`.
pub fn route_path(admin: SocketAddr, destination: &str) -> Option<Vec<String>> {
    let status = status(admin)?;
    let route = status["mesh"]["routes"]
        .as_array()?
        .iter()
        .find(|r| r["destination"] == destination)?
        .clone();
    serde_json::from_value(route["path"].clone()).ok()
}

/// The value of an unlabelled Prometheus counter or gauge (sum over label sets whose
/// text contains `label_filter`).
pub fn metric(admin: SocketAddr, name: &str, label_filter: &str) -> f64 {
    let Some(text) = http_get(admin, "/metrics") else {
        return 0.0;
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The demo-origin byte pattern: byte `i` is `(i * 31 + 7) % 251`.
pub fn pattern_sha256(len: u64) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let period: Vec<u8> = (0u64..251).map(|i| ((i * 31 + 7) % 251) as u8).collect();
    let mut left = len;
    let mut offset = 0usize;
    while left > 0 {
        let take = (251 - offset).min(left as usize);
        h.update(&period[offset..offset + take]);
        left -= take as u64;
        offset = (offset + take) % 251;
    }
    hex::encode(h.finalize())
}

/// Sends `count` websocket messages one at a time and checks each comes back unchanged:
/// text and small binary messages alternate, and every `big_every`-th is 1 MiB of binary.
/// `logs` is appended to a failure.
pub async fn websocket_echo_round_trips<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    count: u32,
    big_every: u32,
    logs: impl Fn() -> String,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 253) as u8).collect();
    for i in 0..count {
        let msg = match i % big_every {
            n if n == big_every - 1 => Message::Binary(big.clone().into()),
            n if n % 2 == 0 => Message::Text(format!("hello {i}").into()),
            _ => Message::Binary(i.to_be_bytes().to_vec().into()),
        };
        ws.send(msg.clone()).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(_))) => continue,
                Some(Ok(m)) => {
                    anyhow::ensure!(m == msg, "message {i} came back changed");
                    break;
                }
                other => anyhow::bail!("message {i}: {other:?}\n{}", logs()),
            }
        }
    }
    Ok(())
}
