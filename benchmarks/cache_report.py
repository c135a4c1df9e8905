#!/usr/bin/env python3
"""Turn the raw files benchmarks/cache.sh wrote into results.json and results.md.

  cache_report.py RESULTS_DIR --command "benchmarks/cache.sh" --rounds 3 --bulk-hits 3

Reads RESULTS_DIR/raw/: wrk-T-R.json (T = target, R = round), bulk-T-fill.json,
bulk-T-hit-H.json, origin-counts.json, machine.json, hit-headers-T.txt.
"""

import argparse
import json
import os
import statistics

from report import load  # benchmarks/report.py, beside this file

TARGETS = {
    "nginx": "nginx proxy_cache (TLS)",
    "varnish": "Varnish (plain HTTP, no TLS)",
    "hitch": "hitch TLS → Varnish",
    "skylane": "Skylane edge cache (TLS)",
}
CACHE_HEADERS = ("cache-status", "x-cache-status", "age", "x-varnish")


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def small(raw, target, rounds):
    runs = [load(f"{raw}/wrk-{target}-{r}.json") for r in range(1, rounds + 1)]
    runs = [r for r in runs if r]
    if not runs:
        return None
    return {
        "rps": median_or_none(r["rps"] for r in runs),
        "p50_us": median_or_none(r["p50_us"] for r in runs),
        "p99_us": median_or_none(r["p99_us"] for r in runs),
        "cpu_us_per_request": median_or_none(
            1e6 * r["cpu_s"] / r["requests"] if r["requests"] else None for r in runs
        ),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "rounds": runs,
    }


def bulk(raw, target, hits):
    fill = load(f"{raw}/bulk-{target}-fill.json", {})
    hit_runs = [load(f"{raw}/bulk-{target}-hit-{h}.json", {}) for h in range(1, hits + 1)]
    ok = [h for h in hit_runs if h.get("status") == 200]
    return {
        "fill_mb_s": fill.get("bytes_per_s", 0) / 1e6 if fill.get("status") == 200 else None,
        "hit_mb_s": median_or_none(h["bytes_per_s"] / 1e6 for h in ok),
        "hit_cpu_s": median_or_none(h.get("cpu_s") for h in ok),
        "fill": fill,
        "hits": hit_runs,
    }


def hit_headers(raw, target):
    try:
        with open(f"{raw}/hit-headers-{target}.txt") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    keep = [line.strip() for line in lines if line.split(":")[0].lower() in CACHE_HEADERS]
    return "; ".join(keep)


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--command", default="benchmarks/cache.sh")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bulk-hits", type=int, default=3)
    ap.add_argument("--bulk-bytes", type=int, default=1 << 30)
    a = ap.parse_args()
    raw = os.path.join(a.dir, "raw")
    machine = load(f"{raw}/machine.json", {})
    counts = load(f"{raw}/origin-counts.json", {})
    results = {
        "command": a.command,
        "machine": machine,
        "origin_counts": counts,
        "targets": {
            t: {
                "label": label,
                "small": small(raw, t, a.rounds),
                "bulk": bulk(raw, t, a.bulk_hits),
                "origin_requests_small": counts.get(f"/cache/small-{t}"),
                "hit_headers": hit_headers(raw, t),
            }
            for t, label in TARGETS.items()
        },
    }
    with open(os.path.join(a.dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    md = [
        "# Edge cache benchmark: cache hits against nginx proxy_cache and Varnish",
        "",
        f"- command: `{a.command}`",
        f"- machine: {machine.get('cpu_model', '?')}, {machine.get('nproc', '?')} cores, "
        f"{machine.get('kernel', '?')}; {machine.get('date_utc', '?')}; checkout "
        f"{machine.get('git_commit', '?')}",
        f"- Skylane binaries: `{machine.get('bin_dir', '?')}`, `mesh-node --version`: "
        f"{machine.get('bin_version', 'not recorded')}",
        f"- versions: nginx {machine.get('nginx', '?')}, Varnish {machine.get('varnish', '?')}, "
        f"{machine.get('hitch', '?')}, wrk {machine.get('wrk', '?')}",
        f"- load: {machine.get('load', '?')}; medians over the rounds. The load generator "
        "shares the two cores with the server under test.",
        "",
        "## Small object (100 bytes, `max-age=3600`), HTTP/1.1 keep-alive, every request a hit",
        "",
        "| server | req/s | p50 ms | p99 ms | server CPU µs/request | errors | origin requests | hit headers |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t, r in results["targets"].items():
        s = r["small"] or {}
        md.append(
            f"| {r['label']} | {fmt(s.get('rps'), ',.0f')} | "
            f"{fmt(s.get('p50_us') and s['p50_us'] / 1000, '.2f')} | "
            f"{fmt(s.get('p99_us') and s['p99_us'] / 1000, '.2f')} | "
            f"{fmt(s.get('cpu_us_per_request'), '.1f')} | {s.get('errors', '—')} | "
            f"{fmt(r['origin_requests_small'], 'd')} | {r['hit_headers']} |"
        )
    md += [
        "",
        f"## A {a.bulk_bytes / (1 << 30):.0f} GiB object, HTTP/1.1, one download at a time",
        "",
        "The first download fills the cache while it streams to the client (through the "
        "tunnel for Skylane); the hits are served from the cache (median of "
        f"{a.bulk_hits}).",
        "",
        "| server | first download MB/s | hit MB/s | server CPU s per hit |",
        "|---|---:|---:|---:|",
    ]
    for t, r in results["targets"].items():
        b = r["bulk"]
        md.append(
            f"| {r['label']} | {fmt(b['fill_mb_s'], ',.0f')} | {fmt(b['hit_mb_s'], ',.0f')} | "
            f"{fmt(b['hit_cpu_s'], '.2f')} |"
        )
    md.append("")
    with open(os.path.join(a.dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
