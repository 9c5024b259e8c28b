"""CPU and wall time of one request/answer round trip between two processes (issue 12's transport):
a DEALER/ROUTER ZeroMQ ``ipc://`` socket (pyzmq, if installed) against a plain Unix socket, each
message a 40-byte header plus a 12 KiB tensor (the demo bundle's 3x32x32 float32 row).

    .venv/bin/python scripts/bench_transport.py [--out results/bench/transport-cpu.json]

CPU: user + system seconds of both processes (ZeroMQ's I/O threads included) per round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import tempfile
import time

N = 20000
HEADER, TENSOR = b"h" * 40, b"x" * 12288
PREFIX = struct.Struct("<II")


def _zmq(path: str, server: bool) -> None:
    import zmq

    ctx = zmq.Context()
    if server:
        r = ctx.socket(zmq.ROUTER)
        r.bind("ipc://" + path)
        for _ in range(N):
            f = r.recv_multipart(copy=False)
            r.send_multipart([f[0], HEADER, TENSOR], copy=False)
        return
    d = ctx.socket(zmq.DEALER)
    d.connect("ipc://" + path)
    for _ in range(N):
        d.send_multipart([HEADER, TENSOR], copy=False)
        d.recv_multipart(copy=False)


def _read(c: socket.socket) -> None:
    h, t = PREFIX.unpack(c.recv(PREFIX.size, socket.MSG_WAITALL))
    c.recv(h + t, socket.MSG_WAITALL)


def _unix(path: str, server: bool) -> None:
    if server:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen()
        c, _ = srv.accept()
        for _ in range(N):
            _read(c)
            c.sendmsg([PREFIX.pack(len(HEADER), len(TENSOR)), HEADER, TENSOR])
        return
    c = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            c.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    for _ in range(N):
        c.sendmsg([PREFIX.pack(len(HEADER), len(TENSOR)), HEADER, TENSOR])
        _read(c)


def measure(kind: str) -> dict:
    run = _zmq if kind == "zmq-ipc" else _unix
    path = os.path.join(tempfile.mkdtemp(prefix="mtserve-transport-"), "s")
    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    pid = os.fork()
    if pid == 0:
        run(path, True)
        os._exit(0)
    time.sleep(0.2)
    t0 = time.perf_counter()
    run(path, False)
    wall = time.perf_counter() - t0
    os.waitpid(pid, 0)
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return {
        "transport": kind,
        "round_trips": N,
        "wall_us": round(wall / N * 1e6, 1),
        "cpu_us": round(cpu / N * 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    kinds = ["unix-socket"]
    try:
        import zmq  # noqa: F401

        kinds.insert(0, "zmq-ipc")
    except ImportError:
        print("pyzmq not installed: Unix socket only")
    rows = [measure(k) for _ in range(args.rounds) for k in kinds]
    for r in rows:
        print(r)
    if args.out:
        result = {"scenario": "transport", "loadavg": os.getloadavg(), "rows": rows,
                  "command": "python scripts/bench_transport.py --out " + args.out}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
