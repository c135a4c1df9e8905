//! Two connectors beside one origin: an edge keeps serving when one drains or dies. A
//! draining connector refuses new streams and the edge sends those requests to the other
//! one at once; a killed connector's requests move once routing sees it gone (well within
//! a second), and the idempotent requests it lost are sent again.

use std::time::{Duration, Instant};

use skylane_tests::{Cluster, ClusterOptions, metric, status};

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
    if preferred == "connector-b" {
        if let Some(s) = c.second.as_mut() {
            s.proc.kill();
        }
    } else {
        c.connector.kill();
    }
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
