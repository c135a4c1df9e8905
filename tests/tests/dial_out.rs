//! A connector that dials out, as cloudflared does: it sits in a network namespace whose
//! firewall (nftables, in the namespace) drops every packet of a flow that starts outside,
//! as an origin network with no inbound port open. The edge on the host has no address for
//! it; it learns one from the connector's own frames and tunnels back through the state the
//! firewall keeps for them. Skipped, with the reason, without root or nftables.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use skylane_shared::identity::NodeKey;
use skylane_tests::netns::{self, Netns};
use skylane_tests::{Proc, TempDir, bin, free_tcp, free_udp};
use tokio_tungstenite::tungstenite::Message;

/// Packets the namespace's firewall dropped so far.
fn dropped(net: &Netns) -> u64 {
    let rules = net
        .exec(&["nft", "list", "chain", "inet", "origin", "input"])
        .unwrap_or_default();
    rules
        .lines()
        .find(|l| l.contains("drop"))
        .and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "packets")?;
            words.next()?.parse().ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_with_no_inbound_port_serves_the_demo() -> anyhow::Result<()> {
    if let Some(why) = netns::unavailable(&["nft"]) {
        eprintln!("SKIPPED: the dial-out test needs a network namespace and nftables: {why}");
        return Ok(());
    }
    let net = Netns::new("skydo")?;
    let dir = TempDir::new("dial-out");
    let d = dir.path().to_owned();
    std::fs::create_dir_all(d.join("keys"))?;
    NodeKey::generate()?.save(&d.join("keys/edge.key"))?;
    NodeKey::generate()?.save(&d.join("keys/connector.key"))?;

    // The origin network's firewall: what starts inside may be answered; nothing that
    // starts outside gets in.
    let nft = |args: &[&str]| {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        net.exec(&all)
    };
    nft(&["add", "table", "inet", "origin"])?;
    nft(&[
        "add",
        "chain",
        "inet",
        "origin",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ])?;
    nft(&[
        "add",
        "rule",
        "inet",
        "origin",
        "input",
        "ct",
        "state",
        "established,related",
        "accept",
    ])?;
    nft(&[
        "add",
        "rule",
        "inet",
        "origin",
        "input",
        "iifname",
        &net.inner_veth,
        "counter",
        "drop",
    ])?;

    // Inside: the demo origin and the connector, which has no address of its own in the
    // member list.
    let edge_mesh = format!("{}:{}", net.host_ip, free_udp().port());
    let members = format!(
        "[[mesh.members]]\nname = \"connector\"\nrole = \"connector\"\npublic_key_file = \"keys/connector.key.pub\"\nregion = \"Frankfurt\"\n\n\
         [[mesh.members]]\nname = \"edge\"\nrole = \"edge\"\npublic_key_file = \"keys/edge.key.pub\"\naddress = \"{edge_mesh}\"\nregion = \"Sydney\"\n\n"
    );
    let mut inside = Vec::new();
    let mut origin = net.command(bin("demo-origin").to_str().unwrap_or_default());
    origin.extend(["--listen", "127.0.0.1:8080", "--name", "origin-inside"].map(String::from));
    let origin: Vec<&str> = origin.iter().map(String::as_str).collect();
    inside.push(Proc::spawn(
        "origin",
        std::path::Path::new("ip"),
        &origin,
        &d,
    )?);
    std::fs::write(
        d.join("connector.toml"),
        format!(
            "shutdown_grace_ms = 1000\n\
             [node]\nname = \"connector\"\nkey_file = \"keys/connector.key\"\nlisten = \"0.0.0.0:7000\"\n\n\
             {members}\
             [services.web]\nservers = [\"127.0.0.1:8080\"]\n"
        ),
    )?;
    let mut connector = net.command(bin("origin-connector").to_str().unwrap_or_default());
    connector.extend([
        "--config".to_owned(),
        d.join("connector.toml").display().to_string(),
    ]);
    let connector: Vec<&str> = connector.iter().map(String::as_str).collect();
    inside.push(Proc::spawn(
        "connector",
        std::path::Path::new("ip"),
        &connector,
        &d,
    )?);

    // Outside: the edge, on the host's end of the link.
    let status = std::process::Command::new(bin("mesh-node"))
        .args(["dev-cert", "--out-dir"])
        .arg(d.join("certs"))
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "mesh-node dev-cert failed");
    let (https, admin) = (free_tcp(), free_tcp());
    std::fs::write(
        d.join("edge.toml"),
        format!(
            "shutdown_grace_ms = 1000\n\
             [node]\nname = \"edge\"\nkey_file = \"keys/edge.key\"\nlisten = \"{edge_mesh}\"\n\n\
             {members}\
             [https]\nlisten = \"{https}\"\n\n[[https.certificates]]\ncert_file = \"certs/edge.pem\"\nkey_file = \"certs/edge.key\"\n\n\
             [admin]\nlisten = \"{admin}\"\n\n\
             [[routes]]\nhost = \"*\"\nservice = \"web\"\n"
        ),
    )?;
    let edge = Proc::spawn(
        "edge",
        &bin("mesh-node"),
        &["--config", d.join("edge.toml").to_str().unwrap_or_default()],
        &d,
    )?;
    let logs = || {
        let mut out = format!("--- edge ---\n{}\n", edge.log());
        for p in &inside {
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                p.log_path().display(),
                p.log()
            ));
        }
        out
    };
    skylane_tests::wait_ready(admin, Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    // The demo: the chat page, and its websocket.
    let ca = d.join("certs/ca.pem");
    let client = skylane_tests::https_client(&ca, https)?;
    let page = client
        .get(format!("https://localhost:{}/", https.port()))
        .send()
        .await?;
    anyhow::ensure!(page.status() == 200, "{}\n{}", page.status(), logs());
    let body = page.text().await?;
    assert!(
        body.contains("origin-inside") || body.contains("<html"),
        "{body}"
    );
    let tls = skylane_tests::tls_config(&ca, &[b"http/1.1"])?;
    let tcp = tokio::net::TcpStream::connect(https).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?;
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", https.port()), stream)
            .await?;
    assert_eq!(resp.status(), 101);
    for i in 0..100 {
        let msg = Message::Text(format!("hello {i}").into());
        ws.send(msg.clone()).await?;
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?;
        assert!(matches!(back, Some(Ok(ref m)) if *m == msg), "{back:?}");
    }
    ws.close(None).await?;

    // The edge learned the connector's address from its frames; none was configured.
    let status = skylane_tests::status(admin).unwrap_or_default();
    let member = status["mesh"]["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "connector"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(member["address_learned"], true, "{status:#}");
    assert_eq!(
        member["address"].as_str().and_then(|a| a.split(':').next()),
        Some(net.ns_ip.as_str()),
        "{status:#}"
    );

    // The firewall does drop what starts outside: a datagram sent in from the host goes
    // nowhere and is counted.
    let before = dropped(&net);
    let probe = std::net::UdpSocket::bind(format!("{}:0", net.host_ip))?;
    probe.send_to(b"hello?", format!("{}:7000", net.ns_ip))?;
    let mut counted = false;
    for _ in 0..50 {
        if dropped(&net) > before {
            counted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(counted, "the firewall let a new flow in");
    Ok(())
}
