//! Starts the real processes of a plan on loopback, behind WAN-emulator links.
//!
//! - `demo-origin` with a plain listener (for the connector, beside it: no added latency)
//!   and a TLS listener (for clients that go straight to the origin).
//! - The scenario's `origin-connector`s (beside the origin: no added latency to it, and
//!   [`CONNECTOR_SITE_RTT_MS`](crate::scenario::CONNECTOR_SITE_RTT_MS) between them) and one
//!   `mesh-node` per edge region. Node `i`'s config gives every
//!   other member `j` the address of a UDP link `i→j` that relays to `j`'s real socket
//!   with the matrix RTT of their regions; the answers come back through the same link.
//! - Per client region: a TCP link to its edge's HTTPS listener (the local RTT) and one to
//!   the origin's TLS listener (the region↔origin RTT).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use skylane_shared::identity::NodeKey;

use crate::procs::{self, Proc};
use crate::scenario::Plan;
use crate::wan::{LinkHandle, LinkProfile, TcpOptions, UdpOptions, Wan};

use super::RealnetError;

/// The cache of the edges when the scenario asks for one: the demo's static assets kept,
/// its API and websocket passed through, the page itself as its headers say (`no-cache`:
/// revalidated every time).
pub const EDGE_CACHE: &str = "[cache]\nmemory_bytes = 67108864\n\n\
[[cache.rules]]\nhost = \"*\"\npath_prefix = \"/api/\"\nmode = \"bypass\"\n\n\
[[cache.rules]]\nhost = \"*\"\npath_prefix = \"/ws\"\nmode = \"bypass\"\n\n\
[[cache.rules]]\nhost = \"*\"\npath_prefix = \"/static/\"\nmode = \"everything\"\nedge_ttl_s = 3600\n\n";

/// One mesh process (connector or edge) and how to reach it.
#[derive(Debug)]
pub struct Node {
    /// Mesh name.
    pub name: String,
    /// The process; `None` while killed by a fault.
    pub proc: Option<Proc>,
    /// Its config, to restart it.
    pub config: PathBuf,
    /// Admin listener (`/status`, `/readyz`).
    pub admin: SocketAddr,
    /// HTTPS listener (edges only).
    pub https: Option<SocketAddr>,
}

/// The front doors of one client region.
#[derive(Clone, Debug)]
pub struct ClientDoors {
    /// TCP link in front of the region's edge HTTPS listener.
    pub edge: SocketAddr,
    /// TCP link in front of the origin's TLS listener.
    pub origin: SocketAddr,
}

/// Everything running for one plan. Dropping it kills every process (see [`Proc`]);
/// call [`Cluster::shutdown`] to also stop the links.
#[derive(Debug)]
pub struct Cluster {
    /// Keys, certificates, configs, logs.
    pub dir: PathBuf,
    /// The demo origin.
    pub origin: Proc,
    /// Its plain listener, beside the connector (no emulated link): `/counts` is read here.
    pub origin_http: SocketAddr,
    /// Connectors first, then edges, as in [`Plan::nodes`].
    pub nodes: Vec<Node>,
    /// Per client region, in plan order.
    pub doors: Vec<ClientDoors>,
    /// The dev CA that signed the edges' and origin's certificate.
    pub ca_pem: PathBuf,
    /// `udp[i][j]`: the link node `i` sends to node `j` through.
    pub udp: Vec<Vec<Option<LinkHandle>>>,
    wan: Option<Wan>,
    bin_dir: PathBuf,
    /// How many of `nodes` are connectors (they come first).
    connectors: usize,
}

fn member_block(name: &str, role: &str, address: SocketAddr) -> String {
    format!(
        "[[mesh.members]]\nname = \"{name}\"\nrole = \"{role}\"\npublic_key_file = \"keys/{name}.key.pub\"\naddress = \"{address}\"\n\n"
    )
}

fn path_str(p: &Path) -> Result<&str, RealnetError> {
    p.to_str()
        .ok_or_else(|| RealnetError::Setup(format!("non-UTF-8 path {}", p.display())))
}

impl Cluster {
    /// Starts everything and waits until every edge's tunnel is up (at most `ready_timeout`).
    pub async fn start(
        plan: &Plan,
        bin_dir: &Path,
        dir: &Path,
        ready_timeout: Duration,
        progress: &dyn Fn(&str),
    ) -> Result<Cluster, RealnetError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| RealnetError::Setup(format!("{what}: {e}"));
        std::fs::create_dir_all(dir.join("keys"))
            .map_err(|e| setup("creating the run directory", &e))?;
        let bin = |name: &str| bin_dir.join(name);
        let status = Command::new(bin("mesh-node"))
            .args(["dev-cert", "--out-dir"])
            .arg(dir.join("certs"))
            .stdout(Stdio::null())
            .status()
            .map_err(|e| setup("running mesh-node dev-cert", &e))?;
        if !status.success() {
            return Err(RealnetError::Setup(format!(
                "mesh-node dev-cert exited with {status}"
            )));
        }
        let (cert, key) = (dir.join("certs/edge.pem"), dir.join("certs/edge.key"));

        // The origin: plain HTTP for the connector, TLS for direct clients.
        progress("starting demo-origin");
        let origin_log = dir.join("demo-origin.log");
        let mut child = Command::new(bin("demo-origin"));
        child
            .args([
                "--listen",
                "127.0.0.1:0",
                "--name",
                "origin",
                "--tls-listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(&origin_log)
                    .map_err(|e| setup("creating the origin log", &e))?,
            );
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt as _;
            child.process_group(0);
        }
        let mut child = child
            .spawn()
            .map_err(|e| setup("starting demo-origin", &e))?;
        let stdout = child.stdout.take();
        let origin = Proc::from_child("demo-origin", child, origin_log);
        let (origin_http, origin_https) = tokio::task::spawn_blocking(move || read_banners(stdout))
            .await
            .map_err(|e| setup("reading demo-origin's banner", &e))??;

        // Keys and ports.
        let n = plan.nodes.len();
        for node in &plan.nodes {
            NodeKey::generate()
                .and_then(|k| k.save(&dir.join(format!("keys/{}.key", node.name))))
                .map_err(|e| setup("generating a node key", &e))?;
        }
        // Ports for the nodes, held open until just before the nodes start, so that the
        // emulator's own sockets (bound to port 0 meanwhile) cannot take them.
        let mut held_tcp = Vec::new();
        let mut held_udp = Vec::new();
        let mut tcp_port = || -> Result<SocketAddr, RealnetError> {
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| setup("finding a TCP port", &e))?;
            let a = l
                .local_addr()
                .map_err(|e| setup("finding a TCP port", &e))?;
            held_tcp.push(l);
            Ok(a)
        };
        let mut real_udp = Vec::new();
        let mut admin = Vec::new();
        let mut https = Vec::new();
        for _ in 0..n {
            admin.push(tcp_port()?);
            https.push(tcp_port()?);
        }
        for _ in 0..n {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")
                .map_err(|e| setup("finding a UDP port", &e))?;
            real_udp.push(
                s.local_addr()
                    .map_err(|e| setup("finding a UDP port", &e))?,
            );
            held_udp.push(s);
        }

        // The mesh links, one per ordered pair.
        progress(&format!("starting {} emulated UDP links", n * (n - 1)));
        let mut wan = Wan::new(plan.scenario.seed);
        let any: SocketAddr = "127.0.0.1:0"
            .parse()
            .map_err(|e| setup("parsing 127.0.0.1:0", &e))?;
        let jitter = plan.scenario.jitter_fraction;
        let mut udp: Vec<Vec<Option<LinkHandle>>> = vec![vec![None; n]; n];
        let mut via = vec![vec![any; n]; n];
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                let rtt = plan.node_rtt_ms(i, j);
                let profile = LinkProfile::from_ms(rtt, rtt / 2.0 * jitter, 0.0)
                    .map_err(|e| setup("a link profile", &e))?;
                let name = format!("{}>{}", plan.nodes[i].name, plan.nodes[j].name);
                let link = wan
                    .add_udp(name, any, real_udp[j], profile, UdpOptions::default())
                    .await
                    .map_err(|e| setup("starting a UDP link", &e))?;
                via[i][j] = link.local_addr();
                udp[i][j] = Some(link.handle().clone());
            }
        }

        // The client doors.
        let mut doors = Vec::new();
        for c in &plan.clients {
            let tcp = |rtt: f64| {
                LinkProfile::from_ms(rtt, rtt / 2.0 * jitter, 0.0)
                    .map_err(|e| setup("a link profile", &e))
            };
            let edge = wan
                .add_tcp(
                    format!("{}-clients>{}", c.region, plan.nodes[c.edge].name),
                    any,
                    https[c.edge],
                    tcp(c.edge_rtt_ms)?,
                    TcpOptions::default(),
                )
                .await
                .map_err(|e| setup("starting a TCP link", &e))?
                .local_addr();
            let origin = wan
                .add_tcp(
                    format!("{}-clients>origin", c.region),
                    any,
                    origin_https,
                    tcp(c.origin_rtt_ms)?,
                    TcpOptions::default(),
                )
                .await
                .map_err(|e| setup("starting a TCP link", &e))?
                .local_addr();
            doors.push(ClientDoors { edge, origin });
        }

        // Configs and processes.
        let extra = &plan.scenario.node_config;
        let mut nodes = Vec::new();
        let role = |j: usize| {
            if plan.is_connector(j) {
                "connector"
            } else {
                "edge"
            }
        };
        for (i, node) in plan.nodes.iter().enumerate() {
            let mut members = String::new();
            for (j, other) in plan.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                members.push_str(&member_block(&other.name, role(j), via[i][j]));
            }
            let own_role = role(i);
            // A node lists itself too (no address needed, but harmless to give its own).
            members.push_str(&member_block(&node.name, own_role, real_udp[i]));
            let name = &node.name;
            let head = format!(
                "shutdown_grace_ms = 1000\n\n[node]\nname = \"{name}\"\nkey_file = \"keys/{name}.key\"\nlisten = \"{udp}\"\n\n{members}[admin]\nlisten = \"{admin}\"\n\n",
                udp = real_udp[i],
                admin = admin[i],
            );
            let body = if plan.is_connector(i) {
                format!(
                    "[services.web]\nservers = [\"{origin_http}\"]\nresponse_timeout_ms = 30000\n\n\
                     [services.web.health_check]\npath = \"/health\"\ninterval_ms = 1000\ntimeout_ms = 500\nhealthy_threshold = 1\nunhealthy_threshold = 3\n\n"
                )
            } else {
                format!(
                    "[https]\nlisten = \"{https}\"\n\n[[https.certificates]]\ncert_file = \"certs/edge.pem\"\nkey_file = \"certs/edge.key\"\nserver_names = [\"localhost\"]\n\n\
                     [[routes]]\nhost = \"*\"\nservice = \"web\"\n\n[tunnel]\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\n{cache}",
                    https = https[i],
                    cache = if plan.scenario.edge_cache {
                        EDGE_CACHE
                    } else {
                        ""
                    },
                )
            };
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(&config, format!("{head}{body}{extra}\n"))
                .map_err(|e| setup("writing a node config", &e))?;
            nodes.push(Node {
                name: name.clone(),
                proc: None,
                config,
                admin: admin[i],
                https: (!plan.is_connector(i)).then_some(https[i]),
            });
        }
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            origin,
            origin_http,
            nodes,
            doors,
            ca_pem: dir.join("certs/ca.pem"),
            udp,
            wan: Some(wan),
            bin_dir: bin_dir.to_owned(),
            connectors: plan.connectors,
        };
        progress(&format!(
            "starting {} and {} edges",
            match plan.connectors {
                1 => "the connector".to_owned(),
                k => format!("{k} connectors"),
            },
            plan.edges().len()
        ));
        drop(held_tcp);
        drop(held_udp);
        for i in 0..n {
            cluster.start_node(i)?;
        }
        for i in plan.edges() {
            let admin = cluster.nodes[i].admin;
            let ready =
                tokio::task::spawn_blocking(move || procs::wait_ready(admin, ready_timeout))
                    .await
                    .unwrap_or(false);
            if !ready {
                let log = cluster.nodes[i]
                    .proc
                    .as_ref()
                    .map(|p| p.log())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(RealnetError::NotReady {
                    node: cluster.nodes[i].name.clone(),
                    log_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                });
            }
        }
        Ok(cluster)
    }

    /// Starts (or restarts) node `i` with its config.
    pub fn start_node(&mut self, i: usize) -> Result<(), RealnetError> {
        let program = if i < self.connectors {
            "origin-connector"
        } else {
            "mesh-node"
        };
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.proc.take() {
            old.kill();
        }
        let proc = Proc::spawn(
            &node.name,
            &self.bin_dir.join(program),
            &["--config", path_str(&node.config)?],
            &self.dir,
        )
        .map_err(|e| RealnetError::Setup(format!("starting {}: {e}", node.name)))?;
        node.proc = Some(proc);
        Ok(())
    }

    /// Kills node `i` at once (SIGKILL), as a crash would.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Both directions of the mesh link between nodes `a` and `b`.
    pub fn link_pair(&self, a: usize, b: usize) -> Vec<&LinkHandle> {
        [(a, b), (b, a)]
            .iter()
            .filter_map(|&(x, y)| self.udp.get(x)?.get(y)?.as_ref())
            .collect()
    }

    /// Stops every process (SIGTERM, then SIGKILL after `grace`) and every link.
    pub async fn shutdown(mut self, grace: Duration) {
        for n in &self.nodes {
            if let Some(p) = &n.proc {
                p.terminate();
            }
        }
        self.origin.terminate();
        let mut procs: Vec<Proc> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.proc.take())
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for p in &mut procs {
                if p.wait_exit(grace).is_none() {
                    p.kill();
                }
            }
        })
        .await;
        self.origin.kill();
        if let Some(wan) = self.wan.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), wan.shutdown()).await;
        }
    }
}

/// Reads demo-origin's two banner lines (`http://ADDR`, `https://ADDR`).
fn read_banners(
    stdout: Option<std::process::ChildStdout>,
) -> Result<(SocketAddr, SocketAddr), RealnetError> {
    use std::io::BufRead as _;
    let stdout = stdout.ok_or_else(|| RealnetError::Setup("demo-origin has no stdout".into()))?;
    let mut reader = std::io::BufReader::new(stdout);
    let mut addr = |scheme: &str| -> Result<SocketAddr, RealnetError> {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| RealnetError::Setup(format!("reading demo-origin's banner: {e}")))?;
        line.trim()
            .rsplit(scheme)
            .next()
            .and_then(|a| a.parse().ok())
            .filter(|_| line.contains(scheme))
            .ok_or_else(|| RealnetError::Setup(format!("unexpected demo-origin banner {line:?}")))
    };
    let http = addr("http://")?;
    let https = addr("https://")?;
    Ok((http, https))
}
