//! Hot reload of a running edge, as an operator does it: edit the config file, then
//! SIGHUP or `POST /reload`. New routes, policy and certificates take effect; an invalid
//! config or one that needs a restart is refused and the config in force keeps serving;
//! an open websocket and open connections stay up through all of it.

use std::time::{Duration, Instant};

use skylane_tests::{
    Cluster, ClusterOptions, admin_post, bin, open_websocket, status, websocket_echo,
};

/// The edge's config generation, from `/status`.
fn generation(c: &Cluster) -> Option<u64> {
    status(c.edges[0].admin)?["config_generation"].as_u64()
}

/// Waits until the edge reports generation `n`.
fn wait_generation(c: &Cluster, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation(c) != Some(n) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the edge is at config generation {:?}, not {n}\n{}",
            generation(c),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_routes_policy_and_certificates_and_keeps_websockets() -> anyhow::Result<()>
{
    let c = Cluster::start(ClusterOptions {
        challenge_secret: true,
        ..ClusterOptions::default()
    })?;
    let edge = &c.edges[0];
    let original = std::fs::read_to_string(&edge.config)?;
    assert_eq!(generation(&c), Some(0));

    // A websocket and a keep-alive client, open before any reload.
    let mut ws = open_websocket(&c, 0).await?;
    websocket_echo(&mut ws, "before").await?;
    let client = c.client(0)?;
    assert_eq!(client.get(c.url(0, "/health")).send().await?.status(), 200);
    assert_eq!(client.get(c.url(0, "/")).send().await?.status(), 200);

    // 1. A new route and "under attack" for localhost, by SIGHUP.
    let reloaded = format!(
        "{original}\n[[routes]]\nhost = \"*\"\npath_prefix = \"/health\"\nservice = \"no-such-service\"\n\n\
         [under_attack]\nsecret_file = \"keys/challenge.secret\"\nhosts = [\"localhost\"]\n"
    );
    std::fs::write(&edge.config, &reloaded)?;
    edge.proc.hangup();
    wait_generation(&c, 1)?;
    let health = client.get(c.url(0, "/health")).send().await?;
    assert_ne!(health.status(), 200, "the new route is not in force");
    let chat = client.get(c.url(0, "/")).send().await?;
    assert_eq!(chat.status(), 403, "the challenge is not in force");
    assert!(chat.text().await?.contains("Checking your browser"));
    websocket_echo(&mut ws, "after the first reload").await?;

    // 2. An invalid config: refused, logged, and the one in force keeps serving.
    std::fs::write(&edge.config, format!("no_such_key = 1\n{reloaded}"))?;
    edge.proc.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !edge.proc.log().contains("config reload refused") {
        anyhow::ensure!(Instant::now() < deadline, "no refusal logged\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        edge.proc.log().contains("no_such_key"),
        "{}",
        edge.proc.log()
    );
    assert_eq!(generation(&c), Some(1));
    assert_eq!(client.get(c.url(0, "/")).send().await?.status(), 403);
    websocket_echo(&mut ws, "after a refused reload").await?;

    // 3. A change only a restart applies, asked for through the admin API: refused.
    std::fs::write(
        &edge.config,
        reloaded.replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 3000"),
    )?;
    assert_eq!(admin_post(edge.admin, "/reload", "{}")?, 400);
    assert_eq!(generation(&c), Some(1));

    // 4. New certificate files under the same names (a renewal), and "under attack" off.
    let fresh = c.dir.path().join("certs-renewed");
    let made = std::process::Command::new(bin("mesh-node"))
        .args(["dev-cert", "--out-dir"])
        .arg(&fresh)
        .output()?;
    anyhow::ensure!(made.status.success(), "dev-cert failed");
    let certs = c.dir.path().join("certs");
    std::fs::copy(fresh.join("edge.pem"), certs.join("edge.pem"))?;
    std::fs::copy(fresh.join("edge.key"), certs.join("edge.key"))?;
    std::fs::write(&edge.config, &original)?;
    assert_eq!(admin_post(edge.admin, "/reload", "{}")?, 200);
    assert_eq!(generation(&c), Some(2));
    // New connections get the new certificate: the old CA no longer verifies it, the
    // new one does.
    let old_ca = skylane_tests::https_client(&c.ca_pem, edge.https)?;
    assert!(
        old_ca.get(c.url(0, "/health")).send().await.is_err(),
        "the edge still presents the old certificate"
    );
    let new_ca = skylane_tests::https_client(&fresh.join("ca.pem"), edge.https)?;
    assert_eq!(new_ca.get(c.url(0, "/health")).send().await?.status(), 200);
    assert_eq!(new_ca.get(c.url(0, "/")).send().await?.status(), 200);
    // The websocket opened under the first certificate and config is still up.
    websocket_echo(&mut ws, "after the certificate reload").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_reloads_its_services_and_keeps_the_websocket() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    let second = skylane_tests::start_origin("127.0.0.1:0", "origin-2", c.dir.path())?;
    let mut ws = open_websocket(&c, 0).await?;
    websocket_echo(&mut ws, "before").await?;
    let client = c.client(0)?;
    let served_by = |r: &reqwest::Response| {
        r.headers()
            .get("x-origin-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let r = client.get(c.url(0, "/health")).send().await?;
    assert_eq!(served_by(&r).as_deref(), Some("origin-1"));

    // The web service moves to the second origin: SIGHUP, and new requests go there.
    let original = std::fs::read_to_string(&c.connector_config)?;
    let moved = original.replace(
        &format!("servers = [\"{}\"]\nresponse_timeout_ms", c.origin.addr),
        &format!("servers = [\"{}\"]\nresponse_timeout_ms", second.addr),
    );
    anyhow::ensure!(moved != original, "the test did not change the config");
    std::fs::write(&c.connector_config, &moved)?;
    c.connector.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client.get(c.url(0, "/health")).send().await?;
        if served_by(&r).as_deref() == Some("origin-2") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "still served by {:?}\n{}",
            served_by(&r),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status(c.connector_admin).and_then(|s| s["config_generation"].as_u64()),
        Some(1)
    );
    // The websocket opened to the first origin is still up through the connector.
    websocket_echo(&mut ws, "after the connector's reload").await?;

    // A bad config is refused; the second origin keeps serving.
    std::fs::write(
        &c.connector_config,
        moved.replace("kind = \"tcp\"", "kind = \"udp\""),
    )?;
    assert_eq!(admin_post(c.connector_admin, "/reload", "{}")?, 400);
    let r = client.get(c.url(0, "/health")).send().await?;
    assert_eq!(served_by(&r).as_deref(), Some("origin-2"));
    Ok(())
}

/// The member list in force for `admin`'s node: names, from `/status`.
fn member_names(admin: std::net::SocketAddr) -> Vec<String> {
    status(admin)
        .and_then(|s| {
            s["mesh"]["members"].as_array().map(|m| {
                m.iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether edge `i` answers `/readyz` with a tunnel up.
fn ready(c: &Cluster, i: usize) -> bool {
    skylane_tests::http_get_status(c.edges[i].admin, "/readyz") == Some(200)
}

/// Waits until edge `i`'s readiness is `want`, at most `limit`, while the websocket keeps
/// echoing `text`; how long it took.
async fn echo_until_ready_is<S>(
    c: &Cluster,
    i: usize,
    want: bool,
    limit: Duration,
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    text: &str,
) -> anyhow::Result<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = Instant::now();
    while ready(c, i) != want {
        anyhow::ensure!(
            start.elapsed() < limit,
            "edge-{i} ready is not {want} after {limit:?}\n{}",
            c.logs()
        );
        websocket_echo(ws, text).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(start.elapsed())
}

/// An edge taken out of the mesh by a reload of the others, and put back: the connector
/// closes its tunnel and refuses it while it is out, takes it back when it is in again,
/// and a websocket through the other edge keeps echoing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leave_and_join_by_reload_and_the_websocket_stays() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        edges: 2,
        ..ClusterOptions::default()
    })?;
    let mut ws = open_websocket(&c, 0).await?;
    websocket_echo(&mut ws, "before").await?;
    assert!(ready(&c, 1));
    let connector_before = std::fs::read_to_string(&c.connector_config)?;
    let edge0_before = std::fs::read_to_string(&c.edges[0].config)?;
    // The member block of edge-1, as both configs have it.
    let start = connector_before
        .find("name = \"edge-1\"")
        .and_then(|at| connector_before[..at].rfind("[[mesh.members]]"))
        .ok_or_else(|| anyhow::anyhow!("no edge-1 block:\n{connector_before}"))?;
    // A member block ends at its blank line.
    let end = connector_before[start..]
        .find("\n\n")
        .map_or(connector_before.len(), |e| start + e + 2);
    let block = connector_before[start..end].to_owned();
    anyhow::ensure!(edge0_before.contains(&block), "edge-0 lacks {block:?}");

    // Out: both reload without edge-1.
    std::fs::write(&c.connector_config, connector_before.replace(&block, ""))?;
    std::fs::write(&c.edges[0].config, edge0_before.replace(&block, ""))?;
    assert_eq!(
        admin_post(c.connector_admin, "/reload", "{}")?,
        200,
        "{}",
        c.logs()
    );
    assert_eq!(
        admin_post(c.edges[0].admin, "/reload", "{}")?,
        200,
        "{}",
        c.logs()
    );
    assert!(!member_names(c.connector_admin).contains(&"edge-1".to_owned()));
    let out = echo_until_ready_is(
        &c,
        1,
        false,
        Duration::from_secs(15),
        &mut ws,
        "while edge-1 leaves",
    )
    .await?;
    println!("edge-1 lost its tunnel {out:?} after the reload");
    let refused = c.client(1)?.get(c.url(1, "/")).send().await?;
    assert!(refused.status().is_server_error(), "{}", refused.status());
    // It stays out: its redials are refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !ready(&c, 1),
        "the connector took edge-1 back while it is not a member"
    );
    websocket_echo(&mut ws, "while edge-1 is out").await?;

    // In again: both reload with it; its tunnel comes back and it serves.
    std::fs::write(&c.connector_config, &connector_before)?;
    std::fs::write(&c.edges[0].config, &edge0_before)?;
    assert_eq!(admin_post(c.connector_admin, "/reload", "{}")?, 200);
    assert_eq!(admin_post(c.edges[0].admin, "/reload", "{}")?, 200);
    let back = echo_until_ready_is(
        &c,
        1,
        true,
        Duration::from_secs(30),
        &mut ws,
        "while edge-1 comes back",
    )
    .await?;
    println!("edge-1 got its tunnel back {back:?} after the reload");
    assert_eq!(c.client(1)?.get(c.url(1, "/")).send().await?.status(), 200);
    assert!(member_names(c.connector_admin).contains(&"edge-1".to_owned()));
    websocket_echo(&mut ws, "after").await?;
    // Changing what a member is (its role) still needs a restart.
    std::fs::write(
        &c.connector_config,
        connector_before.replace(
            &block,
            &block.replace("role = \"edge\"", "role = \"connector\""),
        ),
    )?;
    assert_eq!(admin_post(c.connector_admin, "/reload", "{}")?, 400);
    Ok(())
}
