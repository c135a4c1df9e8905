//! A real browser against the edge: headless Chromium (Debian's `chromium`, installed by
//! `scripts/setup-test-deps.sh`) solves the "under attack" challenge and the chat page's
//! websocket opens behind it; and it draws the status page of the admin listener.
//!
//! Without a `chromium` on PATH the tests say so and pass without running: CI installs it.
//! `SKYLANE_SCREENSHOT_DIR=docs cargo test -p skylane-tests --test browser` also writes
//! the screenshot of the interstitial the docs show.

use std::path::PathBuf;
use std::time::Duration;

use skylane_tests::browser::{LivePage, chromium, run as run_chromium};
use skylane_tests::{Cluster, ClusterOptions, TempDir, metric};

fn cluster(difficulty: u32) -> anyhow::Result<Cluster> {
    Cluster::start(ClusterOptions {
        challenge_secret: true,
        edge_config: format!(
            "[under_attack]\nsecret_file = \"keys/challenge.secret\"\ndifficulty_bits = {difficulty}\nhosts = [\"localhost\"]\n"
        ),
        ..ClusterOptions::default()
    })
}

#[test]
fn chromium_solves_the_challenge_and_the_chat_websocket_opens() -> anyhow::Result<()> {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    };
    let c = cluster(14)?;
    let profile = TempDir::new("chromium");
    // The page runs in real time (challenge, proof of work, redirect, the chat page and
    // its websocket) and is asked every 100 ms whether the websocket is open.
    let runtime = tokio::runtime::Runtime::new()?;
    let (open, dom) = runtime.block_on(async {
        let mut page = LivePage::open(&bin, profile.path(), &c.url(0, "/")).await?;
        let open = page
            .wait_for(
                "document.getElementById('status')?.className === 'status open'",
                Duration::from_secs(30),
            )
            .await?;
        anyhow::Ok((open, page.dom().await))
    })?;
    let admin = c.edges[0].admin;
    assert!(
        metric(admin, "skylane_edge_challenge_total", "solved") >= 1.0,
        "the browser never solved the challenge; DOM:\n{dom}\n{}",
        c.logs()
    );
    assert!(
        open,
        "the chat websocket did not open behind the challenge; DOM:\n{dom}\n{}",
        c.logs()
    );
    assert!(metric(admin, "skylane_edge_challenge_total", "cleared") >= 2.0);
    Ok(())
}

#[test]
fn the_interstitial_as_a_browser_shows_it() -> anyhow::Result<()> {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    };
    // A difficulty no browser solves in the few seconds of the shot: the page stays up.
    let c = cluster(30)?;
    let profile = TempDir::new("chromium-shot");
    let dir = std::env::var_os("SKYLANE_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile.path().to_owned());
    let shot = std::path::absolute(dir.join("under-attack-challenge.png"))?;
    run_chromium(
        &bin,
        profile.path(),
        &[
            "--window-size=1000,640".into(),
            "--timeout=1500".into(),
            format!("--screenshot={}", shot.display()),
            c.url(0, "/chat?room=lobby"),
        ],
    )?;
    let png = std::fs::read(&shot)?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no screenshot"
    );
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

#[test]
fn the_status_page_draws_the_mesh_with_every_nodes_report() -> anyhow::Result<()> {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (scripts/setup-test-deps.sh installs it)");
        return Ok(());
    };
    let c = Cluster::start(ClusterOptions {
        edges: 2,
        ..ClusterOptions::default()
    })?;
    // Each node reports a second after start: wait until the first edge holds all three.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let admin = c.edges[0].admin;
    loop {
        let reports = skylane_tests::status(admin)
            .and_then(|s| s["mesh"]["reports"].as_array().map(|r| r.len()))
            .unwrap_or(0);
        if reports >= 3 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the edge holds {reports} node reports, not 3\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let profile = TempDir::new("chromium-status");
    let dir = std::env::var_os("SKYLANE_SCREENSHOT_DIR").map(PathBuf::from);
    let page = format!("http://{admin}/");
    // The page runs in real time (virtual time does not wait for its fetches on a busy
    // machine) and is asked every 100 ms whether it has drawn a route and every report.
    let runtime = tokio::runtime::Runtime::new()?;
    let dom = runtime.block_on(async {
        let mut live = LivePage::open(&bin, profile.path(), &page).await?;
        live.wait_for(
            "!!document.querySelector('#graph polyline') && \
             (document.body.innerHTML.match(/ s ago<\\/td>/g) || []).length >= 3",
            Duration::from_secs(20),
        )
        .await?;
        anyhow::Ok(live.dom().await)
    })?;
    // The graph names every member, the table has a report from each, and the routes of
    // the edge lead to the connector.
    let graph = dom
        .split("id=\"graph\"")
        .nth(1)
        .and_then(|g| g.split("</svg>").next())
        .unwrap_or_default();
    for node in ["connector", "edge-0", "edge-1"] {
        assert!(
            graph.contains(&format!(">{node}</text>")),
            "{node} is not in the graph; DOM:\n{dom}"
        );
    }
    assert!(graph.contains("<polyline"), "no route drawn; DOM:\n{dom}");
    assert!(dom.contains("Routes of edge-0"), "DOM:\n{dom}");
    assert!(dom.contains("→ connector"), "DOM:\n{dom}");
    assert!(
        dom.matches(" s ago</td>").count() >= 3,
        "not every node's report is shown; DOM:\n{dom}"
    );
    if let Some(dir) = dir {
        let shot = std::path::absolute(dir.join("status-page.png"))?;
        run_chromium(
            &bin,
            profile.path(),
            &[
                "--window-size=1280,1500".into(),
                "--virtual-time-budget=4000".into(),
                format!("--screenshot={}", shot.display()),
                page,
            ],
        )?;
    }
    Ok(())
}
