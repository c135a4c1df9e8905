//! Trust at the mesh boundary: strangers are refused, garbage is counted, nothing crashes.

use std::time::Duration;

use skylane_shared::identity::NodeKey;
use skylane_shared::membership::{Member, Members, Role};
use skylane_shared::mesh::{MeshSocket, virtual_addr};
use skylane_shared::{quic, trust, wire};
use skylane_tests::{
    Cluster, ClusterOptions, Proc, bin, free_tcp, free_udp, http_get_status, metric,
};

/// The member list the test acts under: the cluster's connector and its spare member
/// `edge-test`.
fn connector_and_test_edge(
    connector: skylane_shared::identity::NodeId,
    edge: skylane_shared::identity::NodeId,
) -> anyhow::Result<Members> {
    let member = |id, name: &str, role| Member {
        transport: skylane_shared::membership::Transport::Quic,
        id,
        name: name.into(),
        role,
        address: None,
        region: None,
    };
    Ok(Members::new(vec![
        member(connector, "connector", Role::Connector),
        member(edge, "edge-test", Role::Edge),
    ])?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_unknown_key_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let d = c.dir.path();
    // A stranger: its own config lists itself and the connector, but the connector's
    // member list doesn't know its key.
    let stranger = NodeKey::generate()?;
    stranger.save(&d.join("keys/stranger.key"))?;
    let (udp, https, admin) = (free_udp(), free_tcp(), free_tcp());
    let config = d.join("stranger.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"stranger\"\nkey_file = \"keys/stranger.key\"\nlisten = \"{udp}\"\n\n\
             [[mesh.members]]\nname = \"connector\"\nrole = \"connector\"\npublic_key_file = \"keys/connector.key.pub\"\naddress = \"{}\"\n\n\
             [[mesh.members]]\nname = \"stranger\"\nrole = \"edge\"\npublic_key_file = \"keys/stranger.key.pub\"\n\n\
             [https]\nlisten = \"{https}\"\n[[https.certificates]]\ncert_file = \"certs/edge.pem\"\nkey_file = \"certs/edge.key\"\n\n\
             [[routes]]\nhost = \"*\"\nservice = \"web\"\n\n[admin]\nlisten = \"{admin}\"\n",
            c.connector_udp
        ),
    )?;
    let before = metric(
        c.connector_admin,
        "skylane_mesh_frames_dropped_total",
        "non_member",
    );
    let _proc = Proc::spawn(
        "stranger",
        &bin("mesh-node"),
        &["--config", config.to_str().unwrap_or_default()],
        d,
    )?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        http_get_status(admin, "/readyz"),
        Some(503),
        "a stranger must not get a tunnel"
    );
    let after = metric(
        c.connector_admin,
        "skylane_mesh_frames_dropped_total",
        "non_member",
    );
    assert!(
        after > before,
        "the connector should count the stranger's frames ({before} → {after})"
    );
    let resp = skylane_tests::https_client(&c.ca_pem, https)?
        .get(format!("https://localhost:{}/health", https.port()))
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_claiming_a_members_id_fails_the_handshake() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let connector_id =
        skylane_shared::identity::load_public_key(&c.dir.path().join("keys/connector.key.pub"))?;
    let member = c.spare_member_key.id();
    let stranger = NodeKey::generate()?;
    let members = connector_and_test_edge(connector_id, member)?;
    // Frames carry the member's short id, but TLS is done with the stranger's key.
    let sock = MeshSocket::bind("127.0.0.1:0".parse()?, &c.spare_member_key, members).await?;
    sock.set_peer_addr(&connector_id, c.connector_udp);
    skylane_tests::introduce(&sock, &connector_id).await?;
    let endpoint = quic::endpoint(sock, &stranger, false, quic::fresh_generation())?;
    let attempt = endpoint.connect_with(
        quic::client_config(&stranger, connector_id)?,
        virtual_addr(&connector_id),
        trust::MESH_SERVER_NAME,
    )?;
    // In TLS 1.3 the client finishes its side before the server has judged the client
    // certificate, so the attempt may look connected for a moment; the connector then
    // refuses it and closes the connection. Either way no stream may work.
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Err(_)) => {}
        Ok(Ok(conn)) => {
            let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            assert!(
                closed.is_ok(),
                "the connector must close a stranger's connection"
            );
            assert!(conn.open_bi().await.is_err());
        }
        Err(_) => panic!("the handshake neither failed nor completed"),
    }
    assert!(
        metric(
            c.connector_admin,
            "skylane_mesh_auth_refused_total",
            "unknown_node"
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_and_malformed_headers_are_counted_and_crash_nothing()
-> anyhow::Result<()> {
    use rand::RngCore as _;
    let c = Cluster::start(ClusterOptions::default())?;
    // Garbage UDP at the connector's and the edge's mesh sockets.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let edge_udp: std::net::SocketAddr = {
        let status = skylane_tests::http_get(c.edges[0].admin, "/status").unwrap_or_default();
        let json = status.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json)?;
        v["mesh_socket"].as_str().unwrap_or_default().parse()?
    };
    let mut rng = rand::rng();
    for i in 0..2000 {
        let mut buf = vec![0u8; (i % 1400) + 1];
        rng.fill_bytes(&mut buf);
        if i % 3 == 0 {
            buf[0] = 0x51; // a QUIC kind byte with a random sender
        }
        junk.send_to(&buf, c.connector_udp)?;
        junk.send_to(&buf, edge_udp)?;
    }
    junk.send_to(&[], c.connector_udp)?;

    // A member opens a stream and sends a malformed header.
    let connector_id =
        skylane_shared::identity::load_public_key(&c.dir.path().join("keys/connector.key.pub"))?;
    let key = c.spare_member_key.clone();
    let members = connector_and_test_edge(connector_id, key.id())?;
    let sock = MeshSocket::bind("127.0.0.1:0".parse()?, &key, members).await?;
    sock.set_peer_addr(&connector_id, c.connector_udp);
    skylane_tests::introduce(&sock, &connector_id).await?;
    let endpoint = quic::endpoint(sock, &key, false, quic::fresh_generation())?;
    let conn = endpoint
        .connect_with(
            quic::client_config(&key, connector_id)?,
            virtual_addr(&connector_id),
            trust::MESH_SERVER_NAME,
        )?
        .await?;
    for garbage in [
        &b"\x00\x00\x00\x05hello"[..],
        &b"\xff\xff\xff\xff"[..],
        &b"\x00\x00\x00\x02\x01"[..],
    ] {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(garbage).await?;
        let _ = send.finish();
        match tokio::time::timeout(
            Duration::from_secs(5),
            wire::read_frame::<_, wire::Reply>(&mut recv),
        )
        .await?
        {
            Ok(wire::Reply::Refused(r)) => assert_eq!(r.kind, wire::RefusalKind::BadHeader),
            Ok(other) => anyhow::bail!("garbage header got {other:?}"),
            Err(_) => {} // reset: also a refusal
        }
    }
    assert!(metric(c.connector_admin, "skylane_connector_bad_streams_total", "") >= 3.0);
    assert!(metric(c.connector_admin, "skylane_mesh_frames_dropped_total", "") >= 100.0);
    assert!(metric(c.edges[0].admin, "skylane_mesh_frames_dropped_total", "") >= 100.0);
    // Everyone still serves.
    let resp = c.client(0)?.get(c.url(0, "/health")).send().await?;
    assert_eq!(resp.status(), 200, "{}", c.logs());
    Ok(())
}
