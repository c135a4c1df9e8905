#!/usr/bin/env python3
"""Turn the raw files that benchmarks/run.sh wrote into results.json and results.md.

  report.py RESULTS_DIR --command "benchmarks/run.sh" [--conns 32 --duration 10 ...]

Reads RESULTS_DIR/raw/*: wrk-T-R.json (T = a, b, c, d; R = round), h2-T-R.txt and
h2-T-R.cpu.json (h2load over HTTP/2), ws-T.json, half-T-R.log (h2load --log-file:
start_us, status, latency_us per request), half-T-R.txt, bulk-T.json, machine.json,
after.json.
"""

import argparse
import glob
import json
import os
import re
import statistics

TARGETS = {
    "a": "origin direct (plain HTTP, no TLS)",
    "b": "nginx TLS -> origin",
    "c": "edge -> QUIC tunnel -> connector -> origin",
    "d": "nginx TLS -> rathole (Noise) -> origin",
}

# Issue 14's targets: Skylane (c) against the like-for-like peer (d), then against nginx (b).
PEER_FACTOR = 1.25


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def pct(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def half_stats(log_path, txt_path):
    rows = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if not rows:
        return None
    lat = sorted(r[2] for r in rows)
    start = min(r[0] for r in rows)
    end = max(r[0] + r[2] for r in rows)
    ok = sum(1 for r in rows if 200 <= r[1] < 300)
    out = {
        "requests": len(rows),
        "ok": ok,
        "achieved_rps": round(len(rows) / max(1e-9, (end - start) / 1e6), 1),
        "p50_us": pct(lat, 50),
        "p90_us": pct(lat, 90),
        "p99_us": pct(lat, 99),
        "p999_us": pct(lat, 99.9),
        "max_us": lat[-1],
    }
    try:
        txt = open(txt_path).read()
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", txt)
        if m:
            out["h2load"] = dict(zip(["total", "started", "done", "succeeded", "failed", "errored"], map(int, m.groups())))
    except OSError:
        pass
    return out


def h2_stats(txt_path, cpu_path):
    """req/s, counts and server CPU of one h2load run, from its text output."""
    try:
        txt = open(txt_path).read()
    except OSError:
        return None
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", txt)
    c = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", txt)
    if not m or not c:
        return None
    out = {"rps": float(m.group(2)), "seconds": float(m.group(1)),
           "succeeded": int(c.group(4)), "failed": int(c.group(5)), "errored": int(c.group(6))}
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", txt)
    if lat:
        out["request_time_mean"] = lat.group(3)
    cpu = load(cpu_path, {})
    out["cpu_s"] = cpu
    out["server_cpu_us_per_request"] = round(sum(cpu.values()) / max(1, out["succeeded"]) * 1e6, 1)
    return out


def fmt_us(v):
    if v is None:
        return "n/a"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def peer_verdict(res):
    """Issue 14's rows: each figure of (c) against (d) or (b), as the ratio (c) / reference,
    and whether its target is met. A step in which any of the three had errors (failed
    requests, a bulk download that did not complete with 200) is shown as not valid rather
    than compared."""
    rows = []
    mr, h2, ws, bk = res["max_rate"], res["h2"], res["websocket"], res["bulk"]
    bulk_bytes = res["settings"]["bulk_bytes"]
    clean = {
        "h1": all(mr.get(t, {}).get("errors_total", 1) == 0 for t in "bcd"),
        "h2": all(h2.get(t, {}).get("failed_total", 1) == 0 for t in "bcd"),
        "bulk": all(bk.get(t, {}).get("status") == 200 and bk.get(t, {}).get("bytes") == bulk_bytes
                    for t in "bcd"),
        "ws": True,
    }

    def row(name, b, d, c, target, ref, met, fmt, step):
        valid = clean[step] and ref > 0 and c > 0
        rows.append({"row": name, "b": fmt(b), "d": fmt(d), "c": fmt(c), "target": target,
                     "ratio": f"{c / ref:.2f}x" if valid else "n/a", "met": valid and met, "valid": valid})

    rps = lambda v: f"{v:,.0f} req/s"
    us = lambda v: f"{v:.0f} µs"
    mbs = lambda v: f"{v:,.0f} MB/s"
    if all(t in mr for t in "bcd"):
        b, c, d = (mr[t]["rps_median"] for t in "bcd")
        row("HTTP/1.1 req/s", b, d, c, f">= {PEER_FACTOR}x (d)", d, c >= PEER_FACTOR * d, rps, "h1")
        b, c, d = (mr[t]["server_cpu_us_per_request_median"] for t in "bcd")
        row("HTTP/1.1 server CPU per request", b, d, c, f"<= {1 / PEER_FACTOR:.2f}x (d)", d, c * PEER_FACTOR <= d, us, "h1")
        row("HTTP/1.1 server CPU per request", b, d, c, "<= 1.5x (b)", b, c <= 1.5 * b, us, "h1")
    if all(t in h2 for t in "bcd"):
        b, c, d = (h2[t]["rps_median"] for t in "bcd")
        row("HTTP/2 req/s", b, d, c, f">= {PEER_FACTOR}x (d)", d, c >= PEER_FACTOR * d, rps, "h2")
        b, c, d = (h2[t]["server_cpu_us_per_request_median"] for t in "bcd")
        row("HTTP/2 server CPU per request", b, d, c, f"<= {1 / PEER_FACTOR:.2f}x (d)", d, c * PEER_FACTOR <= d, us, "h2")
    if all("MB_per_s" in bk.get(t, {}) for t in "bcd"):
        b, c, d = (bk[t]["MB_per_s"] for t in "bcd")
        row("bulk download", b, d, c, f">= {PEER_FACTOR}x (d)", d, c >= PEER_FACTOR * d, mbs, "bulk")
        row("bulk download", b, d, c, ">= 0.8x (b)", b, c >= 0.8 * b, mbs, "bulk")
    if all(t in ws for t in "bcd"):
        b, c, d = (ws[t]["p50_us"] for t in "bcd")
        row("websocket echo p50", b, d, c, "<= 1.5x (b)", b, c <= 1.5 * b, us, "ws")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--command", default="benchmarks/run.sh")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--half-conns", type=int, default=64)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--path", default="/api/time")
    ap.add_argument("--bulk-bytes", type=int, default=1 << 30)
    ap.add_argument("--h2-conns", type=int, default=16)
    ap.add_argument("--h2-streams", type=int, default=10)
    args = ap.parse_args()
    raw = os.path.join(args.dir, "raw")

    res = {
        "command": args.command,
        "machine": load(f"{raw}/machine.json", {}),
        "after": load(f"{raw}/after.json", {}),
        "settings": {"connections": args.conns, "duration_s": args.duration, "path": args.path,
                     "bulk_bytes": args.bulk_bytes},
        "targets": TARGETS,
        "max_rate": {}, "websocket": {}, "bulk": {},
    }

    # 1. max rate: median over rounds
    for t in TARGETS:
        rounds = [load(p) for p in sorted(glob.glob(f"{raw}/wrk-{t}-*.json"))]
        rounds = [r for r in rounds if r]
        if not rounds:
            continue
        med = lambda k: statistics.median(r[k] for r in rounds)
        cpu = [sum(r.get("cpu_s", {}).values()) / max(1, r["requests"]) * 1e6 for r in rounds]
        res["max_rate"][t] = {
            "rps_median": med("rps"), "p50_us_median": med("p50_us"), "p99_us_median": med("p99_us"),
            "server_cpu_us_per_request_median": round(statistics.median(cpu), 1),
            "errors_total": sum(sum(r["errors"].values()) for r in rounds),
            "edge_datagrams_per_request_median": round(statistics.median(
                (r.get("edge_datagrams", {}).get("sent", 0) + r.get("edge_datagrams", {}).get("received", 0))
                / max(1, r["requests"]) for r in rounds), 2),
            "rounds": rounds,
        }

    # 1b. HTTP/2: median round by req/s
    res["h2"] = {}
    for t in TARGETS:
        rounds = [h2_stats(p, p[: -len(".txt")] + ".cpu.json") for p in sorted(glob.glob(f"{raw}/h2-{t}-*.txt"))]
        # A round with no request served (the target was down) says nothing about its rate.
        rounds = [r for r in rounds if r and r["succeeded"] > 0]
        if rounds:
            res["h2"][t] = {
                "rps_median": statistics.median(r["rps"] for r in rounds),
                "server_cpu_us_per_request_median": statistics.median(r["server_cpu_us_per_request"] for r in rounds),
                "failed_total": sum(r["failed"] + r["errored"] for r in rounds),
                "rounds": rounds,
            }

    # 2. websocket
    for t in TARGETS:
        w = load(f"{raw}/ws-{t}.json")
        if w:
            res["websocket"][t] = w

    # 3. half load (and the diagnostic rate: half of (c)'s own maximum)
    for key, prefix in (("half_load", "half"), ("half_of_c_max", "halfc")):
        res.setdefault(key, {})
        try:
            res[key]["rate_rps"] = int(open(f"{raw}/{prefix}-rate.txt").read().strip())
        except (OSError, ValueError):
            pass
        for t in TARGETS:
            rs = []
            for log in sorted(glob.glob(f"{raw}/{prefix}-{t}-*.log")):
                r = log[: -len(".log")]
                s = half_stats(log, r + ".txt")
                if s:
                    s["cpu_s"] = load(r + ".cpu.json", {})
                    rs.append(s)
            if rs:
                res[key][t] = {
                    "p50_us_mean": statistics.fmean(r["p50_us"] for r in rs),
                    "p99_us_mean": statistics.fmean(r["p99_us"] for r in rs),
                    "achieved_rps_mean": statistics.fmean(r["achieved_rps"] for r in rs),
                    "rounds": rs,
                }

    # 4. bulk
    for t in TARGETS:
        b = load(f"{raw}/bulk-{t}.json")
        if b:
            b["cpu_s"] = load(f"{raw}/bulk-{t}.cpu.json", {})
            b["edge_datagrams"] = load(f"{raw}/bulk-{t}.frames.json", {})
            if "bytes_per_s" in b:
                b["MB_per_s"] = round(b["bytes_per_s"] / 1e6, 1)
            res["bulk"][t] = b

    # targets
    mr = res["max_rate"]
    verdict = {}
    if "b" in mr and "c" in mr:
        ratio = mr["c"]["rps_median"] / mr["b"]["rps_median"]
        verdict["rate_ratio_c_over_b"] = round(ratio, 3)
        verdict["rate_target_met"] = ratio >= 0.5
    hl = res["half_load"]
    if "b" in hl and "c" in hl:
        verdict["half_load_c_achieved_rps"] = round(hl["c"]["achieved_rps_mean"])
        added = hl["c"]["p99_us_mean"] - hl["b"]["p99_us_mean"]
        verdict["half_load_added_p99_us"] = round(added, 1)
        verdict["latency_target_met"] = added < 1000
    res["verdict"] = verdict
    res["peer_verdict"] = peer_verdict(res)

    with open(os.path.join(args.dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)

    # markdown
    m = res["machine"]
    L = []
    L.append(f"# Skylane benchmark results ({m.get('date_utc', '?')})\n")
    L.append(f"Command: `{args.command}`\n")
    L.append(f"Machine: {m.get('nproc')} cores ({m.get('cpu_model')}), {m.get('mem_total')}, kernel {m.get('kernel')}; "
             f"load average before {m.get('loadavg_before')}, after {res['after'].get('loadavg_after')}. "
             f"Checkout: {m.get('git_commit')}, {m.get('rustc')}; Skylane binaries: `{m.get('bin_dir')}`, "
             f"`mesh-node --version`: {m.get('bin_version', 'not recorded')}. nginx {m.get('nginx')}, wrk {m.get('wrk')}, h2load {m.get('h2load')}.\n")
    L.append(f"## Request rate and latency (wrk -t1 -c{args.conns} -d{args.duration}s, GET {args.path}, HTTP/1.1, "
             f"median of {len(next(iter(mr.values()))['rounds']) if mr else 0} interleaved rounds)\n")
    L.append("| target | req/s | p50 | p99 | server CPU per request | errors |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for t, name in TARGETS.items():
        if t in mr:
            r = mr[t]
            L.append(f"| ({t}) {name} | {r['rps_median']:.0f} | {fmt_us(r['p50_us_median'])} | {fmt_us(r['p99_us_median'])} | "
                     f"{r['server_cpu_us_per_request_median']:.0f} µs | {r['errors_total']} |")
    if "c" in mr:
        L.append("")
        L.append(f"(c) moved {mr['c']['edge_datagrams_per_request_median']} UDP datagrams per request through the edge's mesh socket (sent + received).")
    L.append("")
    L.append("Per round (req/s): " + "; ".join(
        f"({t}) " + ", ".join(f"{r['rps']:.0f}" for r in mr[t]["rounds"]) for t in TARGETS if t in mr) + "\n")

    h2 = res["h2"]
    if h2:
        n = len(next(iter(h2.values()))["rounds"])
        L.append(f"## HTTP/2 request rate (h2load -c{args.h2_conns} -m{args.h2_streams} -D {args.duration}, GET {args.path}, "
                 f"median of {n} interleaved rounds)\n")
        L.append("| target | req/s | server CPU per request | failed | per round (req/s) |")
        L.append("|---|---:|---:|---:|---|")
        for t, name in TARGETS.items():
            if t in h2:
                r = h2[t]
                per_round = ", ".join(f"{x['rps']:.0f}" for x in r["rounds"])
                L.append(f"| ({t}) {name} | {r['rps_median']:.0f} | {r['server_cpu_us_per_request_median']:.0f} µs | "
                         f"{r['failed_total']} | {per_round} |")
        L.append("")

    ws = res["websocket"]
    if ws:
        L.append(f"## Websocket echo round trip (one connection, sequential {next(iter(ws.values()))['size_bytes']}-byte binary messages)\n")
        L.append("| target | messages | p50 | p90 | p99 | max |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for t, name in TARGETS.items():
            if t in ws:
                w = ws[t]
                L.append(f"| ({t}) {name} | {w['messages']} | {fmt_us(w['p50_us'])} | {fmt_us(w['p90_us'])} | {fmt_us(w['p99_us'])} | {fmt_us(w['max_us'])} |")
        L.append("")

    for key, title in (("half_load", "Half load: fixed {rate} req/s (half of (b)'s maximum)"),
                       ("half_of_c_max", "Diagnostic: fixed {rate} req/s (half of (c)'s own maximum)")):
        h = res.get(key, {})
        if "rate_rps" not in h:
            continue
        L.append(f"## {title.format(rate=h['rate_rps'])}, h2load --h1 -c{args.half_conns} --rps, {args.duration}s after 2s warm-up\n")
        L.append("| target | round | achieved req/s | p50 | p90 | p99 | p99.9 | max | failed |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in TARGETS:
            if t in h:
                for i, r in enumerate(h[t]["rounds"], 1):
                    failed = r.get("h2load", {}).get("failed", "?")
                    L.append(f"| ({t}) {TARGETS[t]} | {i} | {r['achieved_rps']:.0f} | {fmt_us(r['p50_us'])} | {fmt_us(r['p90_us'])} | "
                             f"{fmt_us(r['p99_us'])} | {fmt_us(r['p999_us'])} | {fmt_us(r['max_us'])} | {failed} |")
        if "a" in h:
            L.append("")
            L.append(f"(a) is the instrument's floor at this rate: h2load and the origin alone on the same cores.")
        if "b" in h and "c" in h:
            L.append("")
            L.append(f"Added by (c) over (b), mean of rounds: p50 {fmt_us(h['c']['p50_us_mean'] - h['b']['p50_us_mean'])}, "
                     f"p99 {fmt_us(h['c']['p99_us_mean'] - h['b']['p99_us_mean'])}; (c) achieved "
                     f"{h['c']['achieved_rps_mean']:.0f} of {h['rate_rps']} req/s.")
        L.append("")

    bk = res["bulk"]
    if bk:
        L.append(f"## Bulk download ({args.bulk_bytes} bytes, curl --http1.1, one connection)\n")
        L.append("| target | MB/s | seconds | CPU s (origin / nginx / connector / edge / rathole server / rathole client) |")
        L.append("|---|---:|---:|---|")
        for t, name in TARGETS.items():
            if t in bk:
                b = bk[t]
                c = b.get("cpu_s", {})
                cpu = " / ".join(f"{c.get(k, 0):.2f}" for k in
                                 ("origin", "nginx", "connector", "edge", "rathole_server", "rathole_client"))
                if "MB_per_s" in b:
                    L.append(f"| ({t}) {name} | {b['MB_per_s']:.0f} | {b['seconds']:.2f} | {cpu} |")
                else:
                    L.append(f"| ({t}) {name} | failed | | |")
        fr = bk.get("c", {}).get("edge_datagrams", {})
        if fr:
            L.append("")
            L.append(f"(c) edge mesh socket: {fr.get('received', 0)} datagrams received, {fr.get('sent', 0)} sent for the download "
                     f"({args.bulk_bytes / max(1, fr.get('received', 1)):.0f} body bytes per received datagram).")
        L.append("")

    L.append("## Targets (issue 2)\n")
    if "rate_ratio_c_over_b" in verdict:
        L.append(f"- (c) request rate is {verdict['rate_ratio_c_over_b']:.2f} x (b): target >= 0.5 — "
                 f"**{'met' if verdict['rate_target_met'] else 'NOT met'}**")
    if "half_load_added_p99_us" in verdict:
        L.append(f"- added p99 at half load, (c) - (b): {fmt_us(verdict['half_load_added_p99_us'])}: target < 1 ms — "
                 f"**{'met' if verdict['latency_target_met'] else 'NOT met'}** "
                 f"((c) achieved {verdict['half_load_c_achieved_rps']} of {hl['rate_rps']} req/s)")
    L.append("")
    pv = res["peer_verdict"]
    if pv:
        L.append("## Targets (issue 14): Skylane (c) against nginx + rathole (d), then against nginx (b)\n")
        L.append("| row | (b) nginx | (d) nginx + rathole | (c) Skylane | target | (c) / reference |")
        L.append("|---|---:|---:|---:|---|---|")
        for row in pv:
            verdict = ("met" if row["met"] else "not met") if row["valid"] else "not valid: errors in this step"
            L.append(f"| {row['row']} | {row['b']} | {row['d']} | {row['c']} | {row['target']} | "
                     f"**{verdict}** ({row['ratio']}) |")
        L.append("")
    with open(os.path.join(args.dir, "results.md"), "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    main()
