//! Deterministic virtual-time tests of the routing core on the 30-city matrix and a
//! synthetic 100-node mesh. Every run is seeded; a failure message names the seed.

use std::time::Instant;

use skylane_simulations::vnet::experiments;
use skylane_simulations::vnet::{NetConfig, RttMatrix};

fn cities() -> (RttMatrix, usize) {
    let matrix = RttMatrix::builtin();
    let origin = matrix
        .index_of("Frankfurt")
        .expect("Frankfurt is in the matrix");
    (matrix, origin)
}

#[test]
fn every_city_routes_within_5_percent_of_optimal() {
    let (matrix, origin) = cities();
    for seed in [1, 2] {
        let net = experiments::converge(&matrix, origin, NetConfig::default(), seed, 30_000)
            .expect("default config");
        let edges = experiments::edge_routes(&net, &matrix, origin);
        assert_eq!(edges.len(), 29);
        for edge in &edges {
            assert!(
                edge.gap_to_optimal_percent <= 5.0,
                "seed {seed}: {} takes {:?} at {:.1} ms, optimal {:?} at {:.1} ms",
                edge.region,
                edge.chosen_path,
                edge.chosen_rtt_ms,
                edge.optimal_path,
                edge.optimal_rtt_ms
            );
            assert!(
                edge.chosen_rtt_ms <= edge.direct_rtt_ms * 1.02,
                "seed {seed}: {edge:?}"
            );
            assert!(edge.chosen_path.len() <= 4);
        }
        let summary = experiments::summarize(&edges);
        assert!(summary.relayed >= 8, "seed {seed}: {summary:?}");
    }
}

#[test]
fn mesh_view_converges_and_latency_changes_spread() {
    let (matrix, origin) = cities();
    let (report, mut net) =
        experiments::convergence(&matrix, origin, NetConfig::default(), 3, 20_000)
            .expect("default config");
    let full = report.full_view_ms.expect("every node learns every link");
    assert!(full <= 10_000.0, "{report:?}");
    let good = report.routes_within_5_percent_ms.expect("routes converge");
    assert!(good <= 20_000.0, "{report:?}");
    // Paris–Lagos: measured only by Paris and Lagos, known by all after gossip.
    let (paris, lagos) = (
        matrix.index_of("Paris").expect("Paris"),
        matrix.index_of("Lagos").expect("Lagos"),
    );
    let spread = experiments::propagation(&mut net, &matrix, paris, lagos, 1.5);
    let first = spread.first_published_ms.expect("an endpoint notices");
    let all = spread.all_nodes_ms.expect("everyone learns");
    // Noticing takes a few idle probes (5 s apart); spreading takes about a second.
    assert!(first <= 30_000.0, "{spread:?}");
    assert!(all - first <= 3_000.0, "{spread:?}");
}

#[test]
fn gossip_bandwidth_grows_gently() {
    let (matrix, origin) = cities();
    let small = experiments::bandwidth(&matrix, origin, NetConfig::default(), 4, 30_000, 30_000)
        .expect("default config");
    let synthetic = RttMatrix::synthesize(100, 4);
    let large = experiments::bandwidth(&synthetic, 0, NetConfig::default(), 4, 30_000, 20_000)
        .expect("default config");
    assert!(small.gossip_bytes_per_node_per_s < 200.0, "{small:?}");
    assert!(large.gossip_bytes_per_node_per_s < 600.0, "{large:?}");
    // Steady state is dominated by O(N) digests: far below the N² of full link state.
    let ratio = large.gossip_bytes_per_node_per_s / small.gossip_bytes_per_node_per_s;
    assert!(
        ratio < (100.0 / 30.0) * 1.5,
        "ratio {ratio}: {small:?} {large:?}"
    );
}

#[test]
fn failover_moves_the_route_within_a_second_p99() {
    let (matrix, origin) = cities();
    let mut results = Vec::new();
    for seed in [5, 6] {
        let net = experiments::converge(&matrix, origin, NetConfig::default(), seed, 30_000)
            .expect("default config");
        results.extend(experiments::inject_failures(
            &net, &matrix, origin, 60, seed,
        ));
    }
    assert_eq!(results.len(), 120);
    let summary = experiments::summarize_failures(&results);
    assert_eq!(summary.recovered, summary.runs, "{summary:?}");
    assert!(summary.recover_p99_ms < 1000.0, "{summary:?}");
    for r in &results {
        assert!(
            !r.path_after.contains(&r.element),
            "still uses the dead relay: {r:?}"
        );
    }
}

#[test]
fn no_flapping_under_20_percent_jitter_for_an_hour() {
    let (matrix, origin) = cities();
    let started = Instant::now();
    let report = experiments::flapping(&matrix, origin, NetConfig::default(), 7, 3_600_000, 0.2)
        .expect("default config");
    assert!(report.max_switches_per_node_per_10_min <= 1, "{report:?}");
    assert_eq!(report.failovers, 0, "{report:?}");
    eprintln!("{report:?} in {:?}", started.elapsed());
}

/// The mesh socket's sans-IO core driven by the virtual network: every datagram of the
/// 30-city mesh (probes, gossip, data) is framed, authenticated and relayed by the code the
/// real socket runs. Data packets, QUIC and WireGuard alike, cross a relay unopened; when
/// the relay dies, they flow again on another path within a second, intact.
#[test]
fn data_packets_ride_the_mesh_core_through_a_relay_and_its_death() {
    let (matrix, origin) = cities();
    for seed in [1, 2] {
        let started = Instant::now();
        let report = experiments::dataplane_failover(
            &matrix,
            origin,
            NetConfig::default(),
            seed,
            experiments::DataPlanePlan::default(),
        )
        .expect("default config")
        .expect("some edge routes through a relay");
        eprintln!("seed {seed}: {report:?} in {:?}", started.elapsed());
        assert!(report.intact, "seed {seed}: {report:?}");
        assert!(report.forwarded_by_relay > 0, "seed {seed}: {report:?}");
        assert_eq!(report.opened_by_relay, 0, "seed {seed}: {report:?}");
        assert_eq!(report.refused_at_origin, 0, "seed {seed}: {report:?}");
        assert!(
            report.delivered_quic > 0 && report.delivered_wireguard > 0,
            "seed {seed}: {report:?}"
        );
        assert!(
            !report.path_after.contains(&report.relay),
            "seed {seed}: {report:?}"
        );
        let recovered = report.recovered_ms.expect("packets flow again");
        assert!(recovered < 1000.0, "seed {seed}: {report:?}");
        // Only what was sent into the dead path before routing moved is lost.
        let lost_ms = (report.lost_after_crash as u64 * report.interval_ms) as f64;
        assert!(lost_ms <= recovered, "seed {seed}: {report:?}");
    }
}
