#!/usr/bin/env python3
"""results.md of benchmarks/ab.sh: variant A against variant B, from OUT/raw/*.

  ab_report.py OUT --rounds 3 --title T --name-a A --name-b B [--conns 32 --h2 "16 x 10" ...]

Reads h1-V-R.txt (wrk with wrk_json.lua), h2-V-R.txt (h2load), *.cpu ("edge connector
origin" CPU seconds before, then after), *.frames.json (the edge's QUIC datagrams),
*.ctxsw ("edge connector" context switches before, then after; runs since 2026-12-07 17:20),
ws-V.json, bulk-V-R.json, machine.json, after.json.
"""

import argparse
import json
import re
import statistics

from report import load  # the sibling benchmarks/report.py


def cpu(path):
    """CPU seconds (edge, connector, origin) used between the two snapshots."""
    v = [float(x) for x in open(path).read().split()]
    return v[3] - v[0], v[4] - v[1], v[5] - v[2]


def datagrams(out, step, v, r, requests):
    """QUIC datagrams through the edge's mesh socket per request (sent + received)."""
    f = load(f"{out}/raw/{step}-{v}-{r}.frames.json")
    if not f or not requests:
        return None
    return (f.get("sent", 0) + f.get("received", 0)) / requests


def switches(out, step, v, r, requests):
    """Context switches of the edge and the connector per request, or None (older runs)."""
    try:
        x = [int(n) for n in open(f"{out}/raw/{step}-{v}-{r}.ctxsw").read().split()]
    except (OSError, ValueError):
        return None
    if len(x) != 4 or not requests:
        return None
    return (x[2] - x[0]) / requests, (x[3] - x[1]) / requests


def switches_row(values):
    """ "edge / connector" medians of (edge, connector) pairs."""
    return (f"{statistics.median(e for e, _ in values):.2f} / "
            f"{statistics.median(c for _, c in values):.2f}")


def h1(out, v, r):
    text = open(f"{out}/raw/h1-{v}-{r}.txt").read()
    d = json.loads(re.search(r"^JSON (.*)$", text, re.M).group(1))
    return d["rps"], d["requests"], d["p99_us"]


def h2(out, v, r):
    text = open(f"{out}/raw/h2-{v}-{r}.txt").read()
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
    c = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text)
    if not m or not c:
        return None
    return float(m.group(1)), int(c.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--title", default="A against B")
    ap.add_argument("--name-a", default="A")
    ap.add_argument("--name-b", default="B")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--h2", default="16 x 10")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--path", default="/api/time")
    a = ap.parse_args()
    out = a.out
    names = {"A": a.name_a, "B": a.name_b}
    rows = {}
    for v in "AB":
        row = {}
        rps, p99, per_req, per_req_nodes, dgrams, ctx = [], [], [], [], [], []
        for r in range(1, a.rounds + 1):
            x, n, p = h1(out, v, r)
            d = datagrams(out, "h1", v, r, n)
            if d is not None:
                dgrams.append(d)
            s = switches(out, "h1", v, r, n)
            if s is not None:
                ctx.append(s)
            e, c, o = cpu(f"{out}/raw/h1-{v}-{r}.cpu")
            rps.append(x)
            p99.append(p)
            per_req.append((e + c + o) / max(n, 1) * 1e6)
            per_req_nodes.append((e + c) / max(n, 1) * 1e6)
        row["HTTP/1.1 req/s"] = f"{statistics.median(rps):,.0f} ({', '.join(f'{x:,.0f}' for x in rps)})"
        row["HTTP/1.1 p99"] = f"{statistics.median(p99) / 1000:.2f} ms"
        row["HTTP/1.1 server CPU per request (edge + connector + origin)"] = f"{statistics.median(per_req):.0f} µs"
        row["HTTP/1.1 CPU per request, edge + connector only"] = f"{statistics.median(per_req_nodes):.0f} µs"
        if dgrams:
            row["HTTP/1.1 datagrams per request through the edge's mesh socket"] = f"{statistics.median(dgrams):.2f}"
        if ctx:
            row["HTTP/1.1 context switches per request, edge / connector"] = switches_row(ctx)
        rps2, per_req2, per_req2_nodes, dgrams2, ctx2 = [], [], [], [], []
        for r in range(1, a.rounds + 1):
            got = h2(out, v, r)
            if not got or got[1] == 0:
                continue
            x, n = got
            e, c, o = cpu(f"{out}/raw/h2-{v}-{r}.cpu")
            rps2.append(x)
            per_req2.append((e + c + o) / n * 1e6)
            per_req2_nodes.append((e + c) / n * 1e6)
            d = datagrams(out, "h2", v, r, n)
            if d is not None:
                dgrams2.append(d)
            s = switches(out, "h2", v, r, n)
            if s is not None:
                ctx2.append(s)
        if rps2:
            row["HTTP/2 req/s"] = f"{statistics.median(rps2):,.0f} ({', '.join(f'{x:,.0f}' for x in rps2)})"
            row["HTTP/2 server CPU per request (edge + connector + origin)"] = f"{statistics.median(per_req2):.0f} µs"
            row["HTTP/2 CPU per request, edge + connector only"] = f"{statistics.median(per_req2_nodes):.0f} µs"
        if dgrams2:
            row["HTTP/2 datagrams per request through the edge's mesh socket"] = f"{statistics.median(dgrams2):.2f}"
        if ctx2:
            row["HTTP/2 context switches per request, edge / connector"] = switches_row(ctx2)
        ws = load(f"{out}/raw/ws-{v}.json")
        if ws:
            row["websocket echo p50 / p99"] = f"{ws['p50_us']:.0f} / {ws['p99_us']:.0f} µs"
        # One download per round (results before 2026-12-07: one per variant, bulk-V.json).
        runs = [f"bulk-{v}-{r}" for r in range(1, a.rounds + 1)] + [f"bulk-{v}"]
        speeds, per_mb = [], []
        for name in runs:
            bulk = load(f"{out}/raw/{name}.json")
            if not bulk or "bytes" not in bulk or bulk.get("status") != 200:
                continue
            e, c, _ = cpu(f"{out}/raw/{name}.cpu")
            speeds.append(bulk.get("bytes_per_s", 0) / 1e6)
            per_mb.append((e + c) / max(bulk["bytes"] / 1e6, 1e-9) * 1000)
        if speeds:
            row["bulk MB/s"] = f"{statistics.median(speeds):,.0f} ({', '.join(f'{x:,.0f}' for x in speeds)})"
            row["bulk CPU per MB, edge + connector"] = f"{statistics.median(per_mb):.2f} ms"
        rows[v] = row
    m = load(f"{out}/raw/machine.json", {})
    after = load(f"{out}/raw/after.json", {})
    print(f"# {a.title}, one run\n")
    print(f"{m.get('date_utc')}, {m.get('nproc')} × {m.get('cpu_model')}, kernel {m.get('kernel')}, "
          f"checkout {m.get('git_commit')}; load average before {m.get('loadavg_before')}, after "
          f"{after.get('loadavg_after')}.\n")
    print(f"- A, {names['A']}: `{m.get('A')}`")
    print(f"- B, {names['B']}: `{m.get('B')}`\n")
    print(f"GET {a.path}; wrk -t1 -c{a.conns} -d{a.duration}s and h2load -c/-m {a.h2} -D {a.duration}, "
          f"{a.rounds} rounds interleaved A, B, A, B, … (a fresh edge and connector each), medians.\n")
    print(f"| | {names['A']} | {names['B']} |\n|---|---:|---:|")
    keys = list(rows["A"]) + [k for k in rows["B"] if k not in rows["A"]]
    for k in keys:
        print(f"| {k} | {rows['A'].get(k, 'n/a')} | {rows['B'].get(k, 'n/a')} |")


if __name__ == "__main__":
    main()
