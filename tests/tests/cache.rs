//! The edge cache with real clients: hits, rules, coalescing, Vary, ranges, revalidation,
//! serve-stale, purges across the mesh, and the disk tier across a restart. The origin's
//! `/cache/...` endpoint answers with the caching headers a test asks for and counts what
//! reaches it (`/counts`).

use std::time::{Duration, Instant};

use skylane_tests::{Cluster, ClusterOptions, http_get};

fn cache_config(extra_rules: &str) -> String {
    format!(
        "[cache]\nmemory_bytes = 67108864\nmax_object_bytes = 8388608\ncoalesce_wait_ms = 5000\n\n\
         [[cache.rules]]\nhost = \"*\"\npath_prefix = \"/cache/api/\"\nmode = \"bypass\"\n\n\
         [[cache.rules]]\nhost = \"*\"\npath_prefix = \"/cache/short/\"\nmode = \"standard\"\nedge_ttl_s = 1\nbrowser_ttl_s = 30\n\n\
         [[cache.rules]]\nhost = \"*\"\npath_prefix = \"/cache/all/\"\nmode = \"everything\"\n\n{extra_rules}"
    )
}

fn cluster(edges: usize, extra: &str) -> anyhow::Result<Cluster> {
    Cluster::start(ClusterOptions {
        edges,
        edge_config: cache_config(extra),
        ..ClusterOptions::default()
    })
}

/// How many requests for `path` reached the origin.
fn origin_count(c: &Cluster, path: &str) -> u64 {
    let body = http_get(c.origin.addr, "/counts").unwrap_or_default();
    let json = body.split("\r\n\r\n").nth(1).unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v[path].as_u64().unwrap_or(0)
}

struct Got {
    status: u16,
    cache_status: String,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(c: &Cluster, edge: usize, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Got> {
    let mut req = c.client(edge)?.get(c.url(edge, url));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let headers = resp.headers().clone();
    Ok(Got {
        status: resp.status().as_u16(),
        cache_status: headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        headers,
        body: resp.text().await?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_rules_and_ttls() -> anyhow::Result<()> {
    let c = cluster(1, "")?;
    // A hit after a miss, with Cache-Status.
    let url = "/cache/a?cc=public%2C%20max-age%3D60";
    let first = get(&c, 0, url, &[]).await?;
    assert_eq!(first.status, 200);
    assert!(
        first.cache_status.contains("fwd=miss") && first.cache_status.contains("stored"),
        "{}",
        first.cache_status
    );
    let second = get(&c, 0, url, &[]).await?;
    assert!(
        second.cache_status.starts_with("skylane; hit; ttl="),
        "{}",
        second.cache_status
    );
    assert_eq!(second.body, first.body);
    assert!(second.headers.contains_key("age"));
    assert_eq!(origin_count(&c, "/cache/a"), 1);
    // HEAD is answered from the GET's object.
    let head = c.client(0)?.head(c.url(0, url)).send().await?;
    assert_eq!(head.status(), 200);
    assert!(head.headers()["cache-status"].to_str()?.contains("hit"));
    assert_eq!(origin_count(&c, "/cache/a"), 1);
    // A bypass rule: every request reaches the origin.
    for _ in 0..2 {
        let g = get(&c, 0, "/cache/api/x?cc=max-age%3D60", &[]).await?;
        assert_eq!(g.cache_status, "skylane; fwd=bypass");
    }
    assert_eq!(origin_count(&c, "/cache/api/x"), 2);
    // A TTL override (1 s at the edge whatever the origin says) and a browser TTL.
    let short = "/cache/short/x?cc=max-age%3D600";
    let g = get(&c, 0, short, &[]).await?;
    assert_eq!(g.headers["cache-control"], "max-age=30");
    assert!(get(&c, 0, short, &[]).await?.cache_status.contains("hit"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(get(&c, 0, short, &[]).await?.cache_status.contains("fwd="));
    assert_eq!(origin_count(&c, "/cache/short/x"), 2);
    // `everything` caches what the origin says not to; a Set-Cookie answer is never kept.
    let all = "/cache/all/page?cc=no-cache%2C%20private";
    get(&c, 0, all, &[]).await?;
    assert!(get(&c, 0, all, &[]).await?.cache_status.contains("hit"));
    assert_eq!(origin_count(&c, "/cache/all/page"), 1);
    for _ in 0..2 {
        let g = get(
            &c,
            0,
            "/cache/cookie?cc=public%2C%20max-age%3D60&cookie=1",
            &[],
        )
        .await?;
        assert!(g.headers.contains_key("set-cookie"));
        assert!(!g.cache_status.contains("stored"), "{}", g.cache_status);
    }
    assert_eq!(origin_count(&c, "/cache/cookie"), 2);
    // no-store and private are not kept in `standard`.
    for _ in 0..2 {
        get(&c, 0, "/cache/nostore?cc=no-store", &[]).await?;
        get(&c, 0, "/cache/private?cc=private%2C%20max-age%3D60", &[]).await?;
    }
    assert_eq!(origin_count(&c, "/cache/nostore"), 2);
    assert_eq!(origin_count(&c, "/cache/private"), 2);
    let status =
        skylane_tests::status(c.edges[0].admin).ok_or_else(|| anyhow::anyhow!("status"))?;
    assert!(
        status["cache"]["hit_ratio"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        status["cache"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_make_one_origin_request() -> anyhow::Result<()> {
    let c = cluster(1, "")?;
    let client = c.client(0)?;
    let url = c.url(0, "/cache/slow?cc=public%2C%20max-age%3D60&delay_ms=700");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await?;
            let cs = r
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            Ok::<_, reqwest::Error>((r.status().as_u16(), cs, r.text().await?))
        }));
    }
    let mut bodies = std::collections::BTreeSet::new();
    let mut collapsed = 0;
    for t in tasks {
        let (status, cs, body) = t.await??;
        assert_eq!(status, 200);
        collapsed += usize::from(cs.contains("collapsed"));
        bodies.insert(body);
    }
    assert_eq!(
        origin_count(&c, "/cache/slow"),
        1,
        "the origin must see one request"
    );
    assert_eq!(bodies.len(), 1);
    assert!(collapsed >= 90, "{collapsed} of 100 waited for the first");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_ranges_and_revalidation() -> anyhow::Result<()> {
    let c = cluster(1, "")?;
    // Vary: one object per Accept-Language value.
    let url = "/cache/vary?cc=public%2C%20max-age%3D60&vary=accept-language";
    let de = get(&c, 0, url, &[("accept-language", "de")]).await?;
    let fr = get(&c, 0, url, &[("accept-language", "fr")]).await?;
    let de2 = get(&c, 0, url, &[("accept-language", "de")]).await?;
    assert!(de.body.contains("vary-value=de") && fr.body.contains("vary-value=fr"));
    assert_eq!(de2.body, de.body);
    assert!(de2.cache_status.contains("hit"));
    assert_eq!(origin_count(&c, "/cache/vary"), 2);
    // A range of a cached object.
    let big = "/cache/big?cc=public%2C%20max-age%3D60&size=1000";
    let whole = get(&c, 0, big, &[]).await?;
    assert_eq!(whole.body.len(), 1000);
    let part = get(&c, 0, big, &[("range", "bytes=10-19")]).await?;
    assert_eq!(part.status, 206);
    assert_eq!(part.headers["content-range"], "bytes 10-19/1000");
    assert_eq!(part.body, whole.body[10..20]);
    let tail = get(&c, 0, big, &[("range", "bytes=-5")]).await?;
    assert_eq!(tail.body, whole.body[995..]);
    assert_eq!(
        get(&c, 0, big, &[("range", "bytes=2000-")]).await?.status,
        416
    );
    assert_eq!(origin_count(&c, "/cache/big"), 1);
    // Revalidation: a stale object with an ETag is refreshed by the origin's 304.
    let etag = "/cache/etag?cc=public%2C%20max-age%3D1&etag=%22v1%22";
    let first = get(&c, 0, etag, &[]).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let again = get(&c, 0, etag, &[]).await?;
    assert!(
        again.cache_status.contains("fwd-status=304"),
        "{}",
        again.cache_status
    );
    assert_eq!(again.body, first.body, "a 304 keeps the stored body");
    assert!(get(&c, 0, etag, &[]).await?.cache_status.contains("hit"));
    assert_eq!(origin_count(&c, "/cache/etag"), 2);
    // The client's own validators get 304 from the edge.
    let inm = get(&c, 0, etag, &[("if-none-match", "\"v1\"")]).await?;
    assert_eq!(inm.status, 304);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_is_served_while_revalidating_and_while_the_origin_is_down() -> anyhow::Result<()> {
    let mut c = cluster(1, "")?;
    let swr = "/cache/swr?cc=public%2C%20max-age%3D1%2C%20stale-while-revalidate%3D30";
    let first = get(&c, 0, swr, &[]).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = get(&c, 0, swr, &[]).await?;
    assert!(
        stale.cache_status.contains("stale-while-revalidate"),
        "{}",
        stale.cache_status
    );
    assert_eq!(stale.body, first.body);
    let refreshed_by = Instant::now() + Duration::from_secs(5);
    while origin_count(&c, "/cache/swr") < 2 {
        anyhow::ensure!(Instant::now() < refreshed_by, "no background refresh");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stale-if-error: the origin dies; the stale object is served.
    let sie = "/cache/sie?cc=public%2C%20max-age%3D1%2C%20stale-if-error%3D600";
    let before = get(&c, 0, sie, &[]).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    c.origin.proc.kill();
    let during = get(&c, 0, sie, &[]).await?;
    assert_eq!(during.status, 200, "{}", c.logs());
    assert_eq!(during.body, before.body);
    assert!(
        during.cache_status.contains("stale-if-error"),
        "{}",
        during.cache_status
    );
    // Without a stale object, the user sees the error.
    let none = get(&c, 0, "/cache/never-seen?cc=max-age%3D60", &[]).await?;
    assert!(none.status >= 500);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_at_one_edge_empties_the_others() -> anyhow::Result<()> {
    let c = cluster(2, "")?;
    let urls = [
        "/cache/p/one?cc=public%2C%20max-age%3D600&tag=blue",
        "/cache/p/two?cc=public%2C%20max-age%3D600&tag=green",
        "/cache/q/three?cc=public%2C%20max-age%3D600",
    ];
    for u in urls {
        get(&c, 1, u, &[]).await?;
        assert!(get(&c, 1, u, &[]).await?.cache_status.contains("hit"));
    }
    let admin = c.edges[0].admin;
    let purge = |kind: &str, value: &str| {
        let body = serde_json::json!({"kind": kind, "value": value}).to_string();
        skylane_tests::admin_post(admin, "/purge", &body)
    };
    let cref = &c;
    let hit = move |u: &'static str| async move {
        get(cref, 1, u, &[])
            .await
            .map(|g| g.cache_status.contains("hit"))
    };
    // By URL: only that URL goes, at the other edge too, quickly.
    anyhow::ensure!(
        purge(
            "url",
            "localhost/cache/p/one?cc=public%2C%20max-age%3D600&tag=blue"
        )? == 200
    );
    let sent = Instant::now();
    while hit(urls[0]).await? {
        anyhow::ensure!(
            sent.elapsed() < Duration::from_secs(2),
            "edge 1 still serves the purged object"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hit(urls[1]).await?);
    // By tag.
    anyhow::ensure!(purge("tag", "green")? == 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!hit(urls[1]).await?);
    assert!(hit(urls[2]).await?);
    // By prefix, then everything.
    anyhow::ensure!(purge("prefix", "localhost/cache/q/")? == 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!hit(urls[2]).await?);
    assert!(hit(urls[2]).await?);
    anyhow::ensure!(purge("everything", "")? == 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!hit(urls[2]).await?);
    // Only an operator can purge: the admin API wants its token when one is set (tested
    // with the token in the admin tests); a bad kind is refused.
    assert_eq!(purge("regex", "x")?, 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_survives_a_restart() -> anyhow::Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        edge_config: format!(
            "{}\n",
            cache_config("").replace("[cache]\n", "[cache]\ndisk_dir = \"edge-cache\"\n")
        ),
        ..ClusterOptions::default()
    })?;
    let url = "/cache/disk?cc=public%2C%20max-age%3D600&size=20000";
    let first = get(&c, 0, url, &[]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.restart_edge(0)?;
    let after = get(&c, 0, url, &[]).await?;
    assert!(
        after.cache_status.contains("hit"),
        "{}\n{}",
        after.cache_status,
        c.logs()
    );
    assert_eq!(after.body, first.body);
    let part = get(&c, 0, url, &[("range", "bytes=100-199")]).await?;
    assert_eq!(part.body, first.body[100..200]);
    assert_eq!(origin_count(&c, "/cache/disk"), 1);
    Ok(())
}
