//! A stock WireGuard endpoint for the tests: Debian's `wireguard-go` on a TUN device in a
//! network namespace the test creates, configured with `wg` from wireguard-tools, and
//! behind it (in the namespace) a demo origin and, in one mode, a Skylane connector
//! listening on its WireGuard address. The edge runs outside, on the host, and reaches the
//! namespace only through a veth pair: the WireGuard UDP is the one way in.
//!
//! Needs root, `/dev/net/tun`, `ip`, `wg`, `wireguard-go` and `nft`; [`unavailable`] says which
//! is missing so a test can skip with that message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use skylane_shared::identity::NodeKey;

use crate::netns::{Netns, run};
use crate::{Proc, TempDir, bin, free_tcp, free_udp, https_client};

/// The gateway's address inside the tunnel (the WireGuard interface in the namespace).
pub const GATEWAY_IP: &str = "10.77.0.1";
/// The edge's address inside the tunnel.
pub const EDGE_IP: &str = "10.77.0.2";
/// The second edge's address inside the tunnel (a world with a relay edge).
pub const EDGE_B_IP: &str = "10.77.0.3";
/// Where the connector listens on the gateway's WireGuard address.
pub const CONNECTOR_PORT: u16 = 7100;
/// Where the origin listens in the namespace (on every address: loopback for the
/// connector, the WireGuard address for an edge with no connector).
pub const ORIGIN_PORT: u16 = 8080;

/// Why these tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::netns::unavailable(&["wg", "wireguard-go", "nft"]) {
        return Some(why);
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

/// What sits behind the WireGuard endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behind {
    /// A Skylane connector on the gateway's WireGuard address, and the origin beside it.
    Connector,
    /// Only the origin: the edge speaks to it directly through the tunnel.
    Origin,
}

/// The namespace, the endpoint, what is behind it, and an edge on the host using it.
pub struct WgWorld {
    /// Keys, configs, certificates and logs.
    pub dir: TempDir,
    /// The namespace; removed when the world drops, after its processes are killed.
    net: Netns,
    wg_if: String,
    /// The endpoint's UDP address, as the edge dials it.
    pub endpoint: SocketAddr,
    /// Processes in the namespace (killed first when the world ends).
    inside: Vec<Proc>,
    /// The edge.
    pub edge: Proc,
    /// The edge's HTTPS listener.
    pub https: SocketAddr,
    /// The edge's admin listener.
    pub admin: SocketAddr,
    /// The edge's raw TCP listener, to the `echo-tcp` service (the origin's HTTP port).
    pub tcp: SocketAddr,
    /// The CA of the edge's certificate.
    pub ca_pem: PathBuf,
    /// A second edge that may carry the first one's tunnel, and the UDP port the first
    /// one sends to the endpoint from (so its own way can be cut).
    pub relay_edge: Option<RelayEdge>,
}

/// The second edge of a world started with [`WgWorld::start_with_relay`].
#[derive(Debug)]
pub struct RelayEdge {
    /// Its process.
    pub proc: Proc,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// The first edge's WireGuard source port.
    pub own_port: u16,
}

impl std::fmt::Debug for WgWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgWorld")
            .field("ns", &self.net.name)
            .finish()
    }
}

fn wg_keypair() -> anyhow::Result<(String, String)> {
    use std::io::Write as _;
    let private = run(&["wg", "genkey"])?.trim().to_owned();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("wg pubkey stdin")?
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

impl WgWorld {
    /// Sets it all up; `edge_extra` is TOML appended to the edge's config.
    pub fn start(behind: Behind, edge_extra: &str) -> anyhow::Result<Self> {
        Self::start_with(behind, edge_extra, false)
    }

    /// As [`WgWorld::start`] with a connector behind the endpoint, plus a second edge,
    /// `edge-b`, also a peer of the endpoint, that the first edge lists in `relays`. The
    /// first edge sends to the endpoint from a fixed port, so [`WgWorld::cut_own_way`] can
    /// cut its own way and leave edge-b's.
    pub fn start_with_relay() -> anyhow::Result<Self> {
        Self::start_with(Behind::Connector, "", true)
    }

    fn start_with(behind: Behind, edge_extra: &str, relayed: bool) -> anyhow::Result<Self> {
        let net = Netns::new("skywg")?;
        // Unique across namespaces too: wireguard-go's control socket is a file named
        // after the interface (/var/run/wireguard/NAME.sock), shared by every namespace.
        let wg_if = format!("skwg{}", net.id);
        let ns_ip = net.ns_ip.clone();
        let dir = TempDir::new("wireguard");
        let d = dir.path().to_owned();
        let in_ns = |args: &[&str]| net.exec(args);

        // Keys: the gateway's from wg, the edge's derived from its node key.
        let (gw_private, gw_public) = wg_keypair()?;
        std::fs::create_dir_all(d.join("keys"))?;
        std::fs::write(d.join("keys/gateway.wg"), &gw_private)?;
        let edge_key = NodeKey::generate()?;
        edge_key.save(&d.join("keys/edge.key"))?;
        NodeKey::generate()?.save(&d.join("keys/connector.key"))?;
        let edge_wg_public = run(&[
            bin("mesh-node").to_str().context("path")?,
            "wireguard-key",
            "--node-key",
            d.join("keys/edge.key").to_str().context("path")?,
        ])?
        .trim()
        .to_owned();
        let edge_b_wg_public = if relayed {
            NodeKey::generate()?.save(&d.join("keys/edge-b.key"))?;
            Some(
                run(&[
                    bin("mesh-node").to_str().context("path")?,
                    "wireguard-key",
                    "--node-key",
                    d.join("keys/edge-b.key").to_str().context("path")?,
                ])?
                .trim()
                .to_owned(),
            )
        } else {
            None
        };

        let mut inside = Vec::new();
        let ns_bin = |name: &str| -> anyhow::Result<Vec<String>> {
            Ok(net.command(bin(name).to_str().context("path")?))
        };
        // The endpoint: wireguard-go in the foreground, configured by wg.
        let mut wggo_args = net.command("wireguard-go");
        wggo_args.extend(["-f".to_owned(), wg_if.clone()]);
        let wggo_args: Vec<&str> = wggo_args.iter().map(String::as_str).collect();
        inside.push(Proc::spawn(
            "wireguard-go",
            Path::new("ip"),
            &wggo_args,
            &d,
        )?);
        let mut up = false;
        for _ in 0..150 {
            if in_ns(&["ip", "link", "show", &wg_if]).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !up {
            bail!(
                "wireguard-go made no {wg_if} interface:\n{}",
                inside[0].log()
            );
        }
        in_ns(&[
            "wg",
            "set",
            &wg_if,
            "private-key",
            d.join("keys/gateway.wg").to_str().context("path")?,
            "listen-port",
            "51820",
            "peer",
            &edge_wg_public,
            "allowed-ips",
            &format!("{EDGE_IP}/32"),
        ])?;
        if let Some(b) = &edge_b_wg_public {
            in_ns(&[
                "wg",
                "set",
                &wg_if,
                "peer",
                b,
                "allowed-ips",
                &format!("{EDGE_B_IP}/32"),
            ])?;
        }
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY_IP}/24"),
            "dev",
            &wg_if,
        ])?;
        in_ns(&["ip", "link", "set", &wg_if, "up"])?;

        // The origin, on every address of the namespace.
        let mut args = ns_bin("demo-origin")?;
        args.extend([
            "--listen".into(),
            format!("0.0.0.0:{ORIGIN_PORT}"),
            "--name".into(),
            "origin-wg".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        inside.push(Proc::spawn("origin", Path::new("ip"), &args, &d)?);

        let (b_member, b_source) = if relayed {
            (
                "[[mesh.members]]\nname = \"edge-b\"\nrole = \"edge\"\npublic_key_file = \"keys/edge-b.key.pub\"\nregion = \"Singapore\"\n\n",
                format!(", \"{EDGE_B_IP}/32\""),
            )
        } else {
            ("", String::new())
        };
        let route_target = match behind {
            Behind::Connector => {
                let config = format!(
                    "shutdown_grace_ms = 2000\n\
                     [node]\nname = \"connector-wg\"\nregion = \"Frankfurt\"\nkey_file = \"keys/connector.key\"\nlisten = \"127.0.0.1:7000\"\n\n\
                     [[mesh.members]]\nname = \"connector-wg\"\nrole = \"connector\"\npublic_key_file = \"keys/connector.key.pub\"\naddress = \"127.0.0.1:7000\"\nregion = \"Frankfurt\"\n\n\
                     [[mesh.members]]\nname = \"edge-wg\"\nrole = \"edge\"\npublic_key_file = \"keys/edge.key.pub\"\nregion = \"Sydney\"\n\n\
                     {b_member}\
                     [wireguard]\nlisten = \"{GATEWAY_IP}:{CONNECTOR_PORT}\"\nallowed_sources = [\"{EDGE_IP}/32\"{b_source}]\n\n\
                     [services.web]\nservers = [\"127.0.0.1:{ORIGIN_PORT}\"]\n\n\
                     [services.echo-tcp]\nkind = \"tcp\"\nservers = [\"127.0.0.1:{ORIGIN_PORT}\"]\n"
                );
                std::fs::write(d.join("connector.toml"), config)?;
                let mut args = ns_bin("origin-connector")?;
                args.extend([
                    "--config".into(),
                    d.join("connector.toml").display().to_string(),
                ]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let connector = Proc::spawn("connector", Path::new("ip"), &args, &d)?;
                // Listening on its WireGuard address before any edge sends it a flow.
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !connector.log().contains("origin connector ready") {
                    if std::time::Instant::now() > deadline {
                        bail!("the connector did not start:\n{}", connector.log());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                inside.push(connector);
                format!(
                    "[[wireguard.connectors]]\nname = \"connector-wg\"\npeer = \"gateway\"\naddress = \"{GATEWAY_IP}:{CONNECTOR_PORT}\"\n"
                )
            }
            Behind::Origin => format!(
                "[wireguard.services.web]\npeer = \"gateway\"\nservers = [\"{GATEWAY_IP}:{ORIGIN_PORT}\"]\n\n\
                 [wireguard.services.echo-tcp]\npeer = \"gateway\"\nkind = \"tcp\"\nservers = [\"{GATEWAY_IP}:{ORIGIN_PORT}\"]\n"
            ),
        };

        // The edge, on the host.
        let status = Command::new(bin("mesh-node"))
            .args(["dev-cert", "--out-dir"])
            .arg(d.join("certs"))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("mesh-node dev-cert failed");
        }
        let endpoint: SocketAddr = format!("{ns_ip}:51820").parse()?;
        let (https, admin, tcp, udp) = (free_tcp(), free_tcp(), free_tcp(), free_udp());
        let udp_b = free_udp();
        let own_port = free_udp().port();
        let members = |with_b: bool| {
            let mut m = format!(
                "[[mesh.members]]\nname = \"edge-wg\"\nrole = \"edge\"\npublic_key_file = \"keys/edge.key.pub\"\naddress = \"{udp}\"\nregion = \"Sydney\"\n\n"
            );
            if with_b {
                m.push_str(&format!(
                    "[[mesh.members]]\nname = \"edge-b\"\nrole = \"edge\"\npublic_key_file = \"keys/edge-b.key.pub\"\naddress = \"{udp_b}\"\nregion = \"Singapore\"\n\n"
                ));
            }
            m
        };
        // One edge's config: `me` (name, key file, mesh UDP), its listeners, its address in
        // the tunnel and what its peer entry adds.
        let edge_config = |me: (&str, &str, SocketAddr),
                           listen: (SocketAddr, SocketAddr, SocketAddr),
                           tunnel_ip: &str,
                           peer_extra: &str,
                           extra: &str| {
            let (name, key, mesh) = me;
            let (https, admin, tcp) = listen;
            format!(
                "shutdown_grace_ms = 2000\n\
                 [node]\nname = \"{name}\"\nkey_file = \"keys/{key}\"\nlisten = \"{mesh}\"\n\n\
                 {members}\
                 [https]\nlisten = \"{https}\"\n\n[[https.certificates]]\ncert_file = \"certs/edge.pem\"\nkey_file = \"certs/edge.key\"\n\n\
                 [admin]\nlisten = \"{admin}\"\n\n\
                 [[routes]]\nhost = \"*\"\nservice = \"web\"\n\n\
                 [[tcp]]\nlisten = \"{tcp}\"\nservice = \"echo-tcp\"\n\n\
                 [[wireguard.peers]]\nname = \"gateway\"\npublic_key = \"{gw_public}\"\nendpoint = \"{endpoint}\"\naddress = \"{tunnel_ip}\"\nallowed_ips = [\"10.77.0.0/24\"]\n{peer_extra}\n\
                 {route_target}\n{extra}",
                members = members(relayed),
            )
        };
        let relay_edge = if relayed {
            let (https_b, admin_b, tcp_b) = (free_tcp(), free_tcp(), free_tcp());
            let config = edge_config(
                ("edge-b", "edge-b.key", udp_b),
                (https_b, admin_b, tcp_b),
                EDGE_B_IP,
                "",
                "",
            );
            std::fs::write(d.join("edge-b.toml"), config)?;
            let proc = Proc::spawn(
                "edge-b",
                &bin("mesh-node"),
                &["--config", d.join("edge-b.toml").to_str().context("path")?],
                &d,
            )?;
            crate::wait_ready(admin_b, Duration::from_secs(20)).with_context(|| proc.log())?;
            Some(RelayEdge {
                proc,
                admin: admin_b,
                own_port,
            })
        } else {
            None
        };
        let peer_extra = if relayed {
            format!("listen_port = {own_port}\nrelays = [\"edge-b\"]\n")
        } else {
            String::new()
        };
        let config = edge_config(
            ("edge-wg", "edge.key", udp),
            (https, admin, tcp),
            EDGE_IP,
            &peer_extra,
            edge_extra,
        );
        std::fs::write(d.join("edge.toml"), config)?;
        let edge = Proc::spawn(
            "edge",
            &bin("mesh-node"),
            &["--config", d.join("edge.toml").to_str().context("path")?],
            &d,
        )?;
        let world = Self {
            ca_pem: d.join("certs/ca.pem"),
            dir,
            wg_if,
            endpoint,
            inside,
            edge,
            https,
            admin,
            tcp,
            relay_edge,
            net,
        };
        crate::wait_ready(admin, Duration::from_secs(20)).with_context(|| world.logs())?;
        Ok(world)
    }

    /// Cuts the first edge's own way to the endpoint, both ways (an nftables rule in the
    /// namespace on its source port); edge-b's way stays. Only in a world with a relay
    /// edge.
    pub fn cut_own_way(&self) -> anyhow::Result<()> {
        let port = self
            .relay_edge
            .as_ref()
            .context("no relay edge in this world")?
            .own_port
            .to_string();
        let nft = |args: &[&str]| -> anyhow::Result<String> {
            let mut all = vec!["nft"];
            all.extend_from_slice(args);
            self.net.exec(&all)
        };
        nft(&["add", "table", "inet", "skylane_cut"])?;
        for (chain, hook, dir) in [("in", "input", "sport"), ("out", "output", "dport")] {
            nft(&[
                "add",
                "chain",
                "inet",
                "skylane_cut",
                chain,
                &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
            ])?;
            nft(&[
                "add",
                "rule",
                "inet",
                "skylane_cut",
                chain,
                "udp",
                dir,
                &port,
                "drop",
            ])?;
        }
        Ok(())
    }

    /// An HTTPS client for the edge (`https://localhost/…`).
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        https_client(&self.ca_pem, self.https)
    }

    /// `https://localhost:PORT{path}` on the edge.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// `wg show IFACE dump` in the namespace: what the stock endpoint sees.
    pub fn wg_show(&self) -> String {
        self.net
            .exec(&["wg", "show", &self.wg_if, "dump"])
            .unwrap_or_default()
    }

    /// Every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = format!("--- edge ---\n{}\n", self.edge.log());
        if let Some(b) = &self.relay_edge {
            out.push_str(&format!("--- edge-b ---\n{}\n", b.proc.log()));
        }
        for p in &self.inside {
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                p.log_path().display(),
                p.log()
            ));
        }
        out
    }

    /// Where the edge's config file is.
    pub fn edge_config(&self) -> PathBuf {
        self.dir.path().join("edge.toml")
    }
}

impl Drop for WgWorld {
    fn drop(&mut self) {
        self.edge.kill();
        if let Some(b) = &mut self.relay_edge {
            b.proc.kill();
        }
        for p in &mut self.inside {
            p.kill();
        }
        // The namespace goes when `net` drops.
    }
}
