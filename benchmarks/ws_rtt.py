#!/usr/bin/env python3
"""Websocket echo round-trip time, one connection, sequential messages.

Standard library only (socket + ssl), blocking I/O, so the client adds the same
small, steady cost to every target it is pointed at. Sends `--warmup` messages
that are not recorded, then `--count` binary messages of `--size` bytes, one at
a time: send, wait for the echo, record the time. Prints one JSON object.

  ws_rtt.py ws://127.0.0.1:8080/ws  --count 2000
  ws_rtt.py wss://127.0.0.1:8443/ws --count 2000 --insecure

Bounded: a whole run has a wall-clock limit (`--max-seconds`) and every socket
read has a timeout.
"""

import argparse
import base64
import json
import os
import socket
import ssl
import statistics
import struct
import sys
import time
from urllib.parse import urlparse


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


class WsClient:
    def __init__(self, url, insecure, timeout):
        u = urlparse(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError("url must be ws:// or wss://")
        port = u.port or (443 if u.scheme == "wss" else 80)
        host = u.hostname
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if u.scheme == "wss":
            ctx = ssl.create_default_context()
            if insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            # Websocket over HTTP/1.1 upgrade: offer only http/1.1.
            ctx.set_alpn_protocols(["http/1.1"])
            raw = ctx.wrap_socket(raw, server_hostname=host if insecure is False else "localhost")
        self.sock = raw
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path or "/"
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101" not in status:
            raise ConnectionError(f"upgrade refused: {status!r}")

    def _read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_binary(self, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + masked)

    def recv_message(self):
        """Next data frame's payload (unfragmented frames; control frames skipped)."""
        while True:
            b0, b1 = self._read_exact(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read_exact(8))
            if b1 & 0x80:
                self._read_exact(4)  # servers do not mask, but tolerate it
            payload = self._read_exact(n)
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2):
                return payload
            if opcode == 0x8:
                raise ConnectionError("server closed the websocket")

    def close(self):
        try:
            mask = os.urandom(4)
            self.sock.sendall(struct.pack("!BB", 0x88, 0x80) + mask)
        except OSError:
            pass
        self.sock.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()

    payload = os.urandom(args.size)
    client = WsClient(args.url, args.insecure, args.timeout)
    deadline = time.monotonic() + args.max_seconds
    rtts_us = []
    try:
        for i in range(args.warmup + args.count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            client.send_binary(payload)
            echo = client.recv_message()
            t1 = time.perf_counter_ns()
            if echo != payload:
                raise ValueError(f"echo mismatch at message {i}")
            if i >= args.warmup:
                rtts_us.append((t1 - t0) / 1000.0)
    finally:
        client.close()
    s = sorted(rtts_us)
    out = {
        "url": args.url,
        "messages": len(s),
        "requested": args.count,
        "size_bytes": args.size,
        "p50_us": percentile(s, 50),
        "p90_us": percentile(s, 90),
        "p99_us": percentile(s, 99),
        "max_us": s[-1] if s else None,
        "mean_us": statistics.fmean(s) if s else None,
    }
    json.dump(out, sys.stdout)
    print()
    return 0 if len(s) == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
