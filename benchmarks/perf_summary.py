#!/usr/bin/env python3
"""Summarise a `perf record --call-graph dwarf` profile of a Skylane process.

  perf script -i perf.data -F comm,tid,time,period,ip,sym,dso --no-inline | perf_summary.py

Prints three tables:
  1. self time by area (allocator, kernel network, kernel scheduling, TLS/AEAD crypto,
     quinn, hyper, tokio, skylane code, other);
  2. inclusive time of the functions that matter for the data path (first match per
     sample, so percentages do not double count within a row);
  3. who calls the allocator: for samples whose leaf is in malloc/free, the first frame
     that is not allocator, std/alloc/core or a container type.
"""

import collections
import re
import sys

ALLOC_LEAF = re.compile(r"^(malloc|_int_malloc|_int_free|malloc_consolidate|cfree|free|realloc|_int_realloc|"
                        r"unlink_chunk|__libc_malloc|__libc_free|__libc_realloc|tcache|sysmalloc|calloc|"
                        r"__memmove|__memcpy|__memset|alloc_perturb|__rust_alloc|__rust_dealloc|__rust_realloc)")
SKIP_CALLER = re.compile(r"^(__GI___libc|_mid_memalign|alloc_impl|deallocate_impl|grow|spec_write_fmt|<…>::spec_write_fmt|__rustc::|alloc$|drop$|<…>::to_vec|<…>::clone|malloc|_int_|malloc_consolidate|cfree|free|realloc|unlink_chunk|__libc_|tcache|"
                         r"sysmalloc|calloc|__rust_|__rdl_|alloc::|<alloc::|core::|<core::|std::|<std::|"
                         r"hashbrown::|<hashbrown::|bytes::|<bytes::|\[unknown\]|drop_in_place|"
                         r"<\[|\{closure|clone<|do_reserve|finish_grow|grow_|reserve|with_capacity|"
                         r"to_vec|to_owned|extend|from_iter|new<|push|insert|__memmove|__memcpy)")

AREAS = [
    ("allocator (malloc/free/realloc)", lambda s, d: bool(ALLOC_LEAF.match(s)) and "libc" in d),
    ("memcpy/memmove", lambda s, d: s.startswith(("__memmove", "__memcpy", "__memset"))),
    ("kernel: scheduling / futex / epoll", lambda s, d: d.startswith("[kernel") and any(
        k in s for k in ("finish_task_switch", "schedule", "futex", "epoll", "_raw_spin_unlock_irq", "try_to_wake"))),
    ("kernel: other (network stack, syscalls)", lambda s, d: d.startswith("[kernel")),
    ("crypto (ring / AEAD / header protection)", lambda s, d: "ring" in s or "aes" in s.lower() or "gcm" in s.lower()
     or "chacha" in s.lower() or "poly1305" in s.lower() or "ecp_nistz" in s),
    ("quinn / quinn-proto", lambda s, d: "quinn" in s),
    ("rustls", lambda s, d: "rustls" in s),
    ("hyper / hyper-util / h2", lambda s, d: "hyper" in s or s.startswith(("h2::", "<h2::"))),
    ("tokio runtime", lambda s, d: "tokio" in s or "mio::" in s),
    ("skylane code", lambda s, d: any(k in s for k in ("skylane", "mesh_node", "origin_connector"))),
    ("metrics / tracing", lambda s, d: "metrics" in s or "tracing" in s),
    ("postcard / serde", lambda s, d: "postcard" in s or "serde" in s),
]

INCLUSIVE = [
    ("MeshSocket::try_send (UDP send path)", r"MeshSocket.*try_send|AsyncUdpSocket>::try_send"),
    ("MeshSocket::poll_recv (UDP receive path)", r"MeshSocket.*poll_recv|AsyncUdpSocket>::poll_recv"),
    ("quinn ConnectionDriver (all QUIC work)", r"ConnectionDriver"),
    ("quinn_proto::Connection::poll_transmit", r"quinn_proto::connection::Connection::poll_transmit"),
    ("quinn_proto::Connection::handle_event / process", r"quinn_proto::connection::Connection::(handle_event|handle_packet|process_payload|process_decrypted)"),
    ("quinn Endpoint driver / recv", r"EndpointDriver|EndpointInner.*drive_recv|RecvState.*poll_socket"),
    ("QUIC packet crypto (quinn rustls)", r"quinn::crypto::rustls|quinn_proto::crypto::rustls|PacketKey|HeaderProtection"),
    ("rustls record layer (user-facing TLS)", r"^rustls::|^<rustls::"),
    ("mesh_node::proxy::handle", r"mesh_node::proxy::handle"),
    ("mesh_node::proxy::respond", r"mesh_node::proxy::respond"),
    ("mesh_node::proxy::origin_head", r"mesh_node::proxy::origin_head"),
    ("origin_connector::forward::handle_stream", r"origin_connector::forward::handle_stream"),
    ("origin_connector::forward::relay_response", r"origin_connector::forward::relay_response"),
    ("hyper_util legacy Client (connector -> origin)", r"hyper_util::client::legacy"),
    ("skylane_shared::wire (frames, headers)", r"skylane_shared::wire"),
    ("skylane_shared::pipe::TunnelBody", r"TunnelBody"),
    ("metrics recording", r"^metrics::|<metrics|metrics_exporter|metrics_util"),
    ("tracing spans/events", r"tracing_core::|tracing_subscriber::|tracing::span::|Span>::(enter|exit|new|drop)|tracing::Span::"),
    ("hyper h1 server dispatch (client side of edge)", r"hyper::proto::h1::dispatch::Server|Dispatcher.*Server"),
    ("sendmsg/sendto syscalls", r"__sys_sendto|__sys_sendmsg|sendmmsg"),
    ("recvmsg/recvfrom syscalls", r"__sys_recvfrom|__sys_recvmsg|recvmmsg"),
    ("TCP writev/write syscalls", r"do_writev|ksys_write|tcp_sendmsg"),
    ("epoll_wait", r"do_epoll_wait"),
]


def parse(stream):
    """Yield (period, [frames leaf-first as (sym, dso)]) per sample."""
    period, frames, header = 1, [], False
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if header:
                yield period, frames
            period, frames, header = 1, [], False
            continue
        if not line.startswith((" ", "\t")):
            header = True
            parts = line.split()
            # comm tid time: period
            for i, p in enumerate(parts):
                if p.endswith(":") and i + 1 < len(parts) and parts[i + 1].isdigit():
                    period = int(parts[i + 1])
            try:
                period = int(parts[-1]) if parts[-1].isdigit() else period
            except ValueError:
                pass
            continue
        m = re.match(r"\s+[0-9a-f]+\s+(.*)\s+\((.*)\)$", line)
        if not m:
            continue
        sym, dso = m.group(1), m.group(2)
        sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
        frames.append((sym, dso))
    if header:
        yield period, frames


def short(sym, n=110):
    sym = re.sub(r"<[^<>]*(<[^<>]*(<[^<>]*>)*[^<>]*>)*[^<>]*>", "<…>", sym)
    return sym if len(sym) <= n else sym[: n - 1] + "…"


def main():
    samples = list(parse(sys.stdin))
    total = sum(p for p, f in samples if f) or 1
    areas = collections.Counter()
    incl = collections.Counter()
    callers = collections.Counter()
    alloc_total = 0
    compiled = [(name, re.compile(rx)) for name, rx in INCLUSIVE]
    for period, frames in samples:
        if not frames:
            continue
        leaf_sym, leaf_dso = frames[0]
        for name, test in AREAS:
            if test(leaf_sym, leaf_dso):
                areas[name] += period
                break
        else:
            areas["other"] += period
        for name, rx in compiled:
            if any(rx.search(s) for s, _ in frames):
                incl[name] += period
        if ALLOC_LEAF.match(leaf_sym) and not leaf_sym.startswith(("__memmove", "__memcpy", "__memset")):
            alloc_total += period
            for s, d in frames[1:]:
                if not SKIP_CALLER.match(s) and "libc" not in d:
                    callers[short(s)] += period
                    break
            else:
                callers["(no caller frame)"] += period

    print(f"samples: {len(samples)}")
    print("\n## Self time by area\n")
    for name, v in areas.most_common():
        print(f"{100 * v / total:6.1f}%  {name}")
    print("\n## Inclusive time\n")
    for name, _ in INCLUSIVE:
        if incl[name]:
            print(f"{100 * incl[name] / total:6.1f}%  {name}")
    others = collections.Counter()
    for period, frames in samples:
        if frames:
            s0, d0 = frames[0]
            if not any(test(s0, d0) for _, test in AREAS):
                others[short(s0) + "  [" + d0.split("/")[-1] + "]"] += period
    print("\n## Top self symbols in 'other'\n")
    for name, v in others.most_common(12):
        print(f"{100 * v / total:6.1f}%  {name}")
    print(f"\n## Allocator callers ({100 * alloc_total / total:.1f}% of all samples are in malloc/free)\n")
    for name, v in callers.most_common(25):
        print(f"{100 * v / total:6.1f}%  {name}")


if __name__ == "__main__":
    main()
