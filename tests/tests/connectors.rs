//! Two connectors beside one origin: an edge keeps serving when one drains or dies. A
//! draining connector refuses new streams and the edge sends those requests to the other
//! one at once; a killed connector's requests move once routing sees it gone (well within
//! a second), and the idempotent requests it lost are sent again. Websockets through a
//! killed connector end as soon as the edge has no path left to it (they cannot move: the
//! connector held their origin connection), with a close frame that tells the client to
//! reconnect, and new ones open through the other.

use std::time::{Duration, Instant};

use skylane_tests::{Cluster, ClusterOptions, metric, open_websocket, status, websocket_echo};

/// Waits until edge 0 has a tunnel up to both connectors and routing prefers one.
fn wait_both_up(c: &Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = status(c.edges[0].admin)
            .and_then(|s| {
                s["tunnels"]
                    .as_array()
                    .map(|t| t.iter().filter(|t| t["up"] == true).count())
            })
            .unwrap_or(0);
        if up == 2 && !preferred(c).is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{up} of 2 tunnels up\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The connector edge 0 sends new flows to.
fn preferred(c: &Cluster) -> String {
    status(c.edges[0].admin)
        .and_then(|s| {
            s["mesh"]["preferred_destination"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// GETs `/health` back to back for `run`; (started, ok) per request.
async fn requests_for(c: &Cluster, run: Duration) -> anyhow::Result<Vec<(Instant, bool)>> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&c.ca_pem)?)?)
        .resolve("localhost", c.edges[0].https)
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = c.url(0, "/health");
    let end = Instant::now() + run;
    let mut out = Vec::new();
    while Instant::now() < end {
        let started = Instant::now();
        let ok = matches!(client.get(&url).send().await, Ok(r) if r.status() == 200);
        out.push((started, ok));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_connector_hands_its_requests_to_the_other_without_an_error()
-> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions {
        second_connector: true,
        ..ClusterOptions::default()
    })?;
    wait_both_up(&c)?;
    // SIGTERM to the connector the edge prefers, half a second into the load: it refuses
    // new streams while it drains, then closes its tunnels and exits.
    let victim = preferred(&c);
    let load = requests_for(&c, Duration::from_secs(5));
    let drain = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match (&victim[..], &c.second) {
            ("connector-b", Some(b)) => b.proc.terminate(),
            _ => c.connector.terminate(),
        }
    };
    let (results, ()) = tokio::join!(load, drain);
    let results = results?;
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    assert!(results.len() > 50, "only {} requests", results.len());
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed while a connector drained\n{}",
        results.len(),
        c.logs()
    );
    Ok(())
}

/// Kills the connector edge 0 prefers; returns its name.
fn kill_preferred(c: &mut Cluster) -> String {
    let preferred = preferred(c);
    if preferred == "connector-b" {
        if let Some(s) = c.second.as_mut() {
            s.proc.kill();
        }
    } else {
        c.connector.kill();
    }
    preferred
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connector_s_websockets_end_at_once_and_new_ones_open_through_the_other()
-> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let mut c = Cluster::start(ClusterOptions {
        second_connector: true,
        ..ClusterOptions::default()
    })?;
    wait_both_up(&c)?;
    let mut old = open_websocket(&c, 0).await?;
    websocket_echo(&mut old, "before").await?;
    let victim = kill_preferred(&mut c);
    let killed = Instant::now();
    // New websockets, one after another, each opened and echoed once (or failed) within
    // 3 s: when each was started, and whether it worked.
    let opener = async {
        let mut tries = Vec::new();
        while killed.elapsed() < Duration::from_secs(3) {
            let started = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(3), async {
                let mut ws = open_websocket(&c, 0).await?;
                websocket_echo(&mut ws, "new").await
            })
            .await
            .is_ok_and(|r| r.is_ok());
            tries.push((started.duration_since(killed), ok));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tries
    };
    // The old websocket: how long until it ends (QUIC's idle timeout would be 10 s), and
    // how: the edge's close frame, or the connection just dropping.
    let old_end = async {
        use tokio_tungstenite::tungstenite::Message;
        let ended = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                match old.next().await {
                    Some(Ok(Message::Close(frame))) => return (killed.elapsed(), Some(frame)),
                    Some(Ok(_)) => continue,
                    _ => return (killed.elapsed(), None),
                }
            }
        })
        .await;
        ended.ok()
    };
    let (tries, ended) = tokio::join!(opener, old_end);
    eprintln!("{victim} killed: the websocket on it ended after {ended:?}; new ones: {tries:?}");
    let (ended, close) = ended.ok_or_else(|| {
        anyhow::anyhow!(
            "the websocket through {victim} was still open 8 s after it died\n{}",
            c.logs()
        )
    })?;
    assert!(
        ended < Duration::from_secs(3),
        "the websocket through {victim} ended only after {ended:?}"
    );
    // 1012, "service restart": the client is told to reconnect, and does so through the
    // other connector.
    let code = close.flatten().map(|f| u16::from(f.code));
    assert_eq!(
        code,
        Some(1012),
        "the websocket through {victim} did not end with a close frame 1012"
    );
    let first_ok = tries
        .iter()
        .find(|(_, ok)| *ok)
        .map(|(t, _)| *t)
        .ok_or_else(|| anyhow::anyhow!("no new websocket worked: {tries:?}\n{}", c.logs()))?;
    assert!(
        first_ok <= Duration::from_secs(1),
        "the first new websocket that worked was started {first_ok:?} after the kill"
    );
    let late_failed: Vec<_> = tries
        .iter()
        .filter(|(t, ok)| !ok && *t > Duration::from_secs(1))
        .collect();
    assert!(
        late_failed.is_empty(),
        "websockets started after the first second failed: {late_failed:?}\n{}",
        c.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connector_s_requests_move_to_the_other_within_a_second() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        second_connector: true,
        ..ClusterOptions::default()
    })?;
    wait_both_up(&c)?;
    // Kill the connector the edge prefers (and uses: it took the warm-up's streams), so
    // the edge must move.
    let preferred = preferred(&c);
    let (victim, other) = match &c.second {
        Some(b) if preferred == "connector-b" => (b.admin, c.connector_admin),
        Some(b) => (c.connector_admin, b.admin),
        None => anyhow::bail!("no second connector"),
    };
    let warm = requests_for(&c, Duration::from_millis(500)).await?;
    assert!(warm.iter().all(|(_, ok)| *ok));
    let streams = |admin| metric(admin, "skylane_connector_streams_total", "web");
    assert!(
        streams(victim) >= warm.len() as f64,
        "the preferred connector did not carry the requests"
    );
    let other_before = streams(other);
    kill_preferred(&mut c);
    let killed = Instant::now();
    let results = requests_for(&c, Duration::from_secs(4)).await?;
    let late_failures: Vec<_> = results
        .iter()
        .filter(|(t, ok)| !ok && t.duration_since(killed) > Duration::from_secs(1))
        .collect();
    assert!(
        late_failures.is_empty(),
        "{} requests started more than a second after {preferred} was killed failed\n{}",
        late_failures.len(),
        c.logs()
    );
    assert!(streams(other) > other_before + 20.0);
    let late = results
        .iter()
        .filter(|(t, _)| t.duration_since(killed) > Duration::from_secs(1))
        .count();
    assert!(
        late > 20,
        "only {late} requests after the first second\n{}",
        c.logs()
    );
    // Every request is an idempotent GET: one lost with the connector is sent again on the
    // other, so none fails at all.
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} GETs failed after {preferred} was killed\n{}",
        results.len(),
        c.logs()
    );
    Ok(())
}
