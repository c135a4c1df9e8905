#!/usr/bin/env python3
"""Can the kernel hand each shard its own datagrams? A check of this machine's kernel.

The mesh socket is one UDP socket, read on shard 0; a datagram for a QUIC connection that
lives on another shard is handed over to that shard's thread (docs/benchmarks.md,
2026-12-08). Between an edge and a connector every datagram has the same address pair, so
SO_REUSEPORT's hash would put them all on one socket. A classic BPF program attached to
the reuseport group (SO_ATTACH_REUSEPORT_CBPF) can instead choose the socket by a byte of
the datagram, such as a shard number inside the QUIC connection ID.

This script checks, on loopback only, with a bounded number of datagrams:
  1. N sockets bound to one port, one sender, one address pair: does every datagram reach
     the socket its steering byte names?
  2. When a socket leaves the group and another joins, which index does each one get?
     (A process that takes over the mesh socket from its predecessor must know.)

  python3 benchmarks/steering_check.py

Linux only. Exits 1 if the steering does not hold.
"""

import ctypes
import socket
import sys
import time

SO_ATTACH_REUSEPORT_CBPF = 51  # include/uapi/asm-generic/socket.h
SOCKETS = 3
BYTE_AT = 10  # where the steering byte sits in each datagram
DATAGRAMS = 300

# struct sock_filter and struct sock_fprog (include/uapi/linux/filter.h).
class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


BPF_LD, BPF_B, BPF_ABS = 0x00, 0x10, 0x20
BPF_ALU, BPF_MOD, BPF_K = 0x04, 0x90, 0x00
BPF_RET, BPF_A = 0x06, 0x10


def steering_program(byte_at, sockets):
    """A = datagram[byte_at] % sockets; return A (the socket's index in the group)."""
    return [
        SockFilter(BPF_LD | BPF_B | BPF_ABS, 0, 0, byte_at),
        SockFilter(BPF_ALU | BPF_MOD | BPF_K, 0, 0, sockets),
        SockFilter(BPF_RET | BPF_A, 0, 0, 0),
    ]


def bound(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def drain(s):
    got = []
    while True:
        try:
            got.append(s.recv(2048)[BYTE_AT])
        except BlockingIOError:
            return got


def main():
    group = [bound(0)]
    port = group[0].getsockname()[1]
    group += [bound(port) for _ in range(SOCKETS - 1)]
    prog = (SockFilter * 3)(*steering_program(BYTE_AT, SOCKETS))
    fprog = SockFprog(len(prog), prog)
    try:
        group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                            ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)))
    except OSError as e:
        print(f"SO_ATTACH_REUSEPORT_CBPF refused: {e}")
        return 1
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(DATAGRAMS):
        sender.sendto(bytes(BYTE_AT) + bytes([n % 7]) + b"payload", ("127.0.0.1", port))
    time.sleep(0.05)
    right = wrong = 0
    for index, s in enumerate(group):
        for b in drain(s):
            if b % SOCKETS == index:
                right += 1
            else:
                wrong += 1
    print(f"1. one sender, one address pair, {SOCKETS} sockets: {right} of {DATAGRAMS} datagrams "
          f"reached the socket their byte named, {wrong} another one")

    group[1].close()
    joined = bound(port)
    for b in range(SOCKETS):
        sender.sendto(bytes(BYTE_AT) + bytes([b]) + b"again", ("127.0.0.1", port))
    time.sleep(0.05)
    indices = {name: drain(s) for name, s in
               [("the first socket", group[0]), ("the third socket", group[2]), ("the new socket", joined)]}
    print("2. after the second socket closed and a new one joined, the index each one now has: "
          + "; ".join(f"{name} {got}" for name, got in indices.items()))
    print("   (the last socket of the group moves into the slot that was freed; a newcomer is appended)")
    return 0 if right == DATAGRAMS and wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
