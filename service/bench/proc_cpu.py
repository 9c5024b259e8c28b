"""CPU seconds of a server's processes and threads from /proc (Linux), and what each thread is for.

Process CPU seconds (``/proc/PID/stat`` fields 14 + 15, all threads, exited ones too) before and
after a fixed number of requests do not depend on what else the machine runs, unlike throughput.
Threads are named with py-spy (``py-spy dump --json``; Python threads only) when it is installed:

- a process whose command line is ``service.supervisor engine`` (``--workers N``): every thread
  ``engine``;
- in a process that holds an engine (``mtserve-engine*`` thread, ``--workers 0``): that thread and the
  threads without a Python name (onnxruntime's pool) ``engine``;
- ``MainThread`` ``loop`` (the event loop), ``*-decode*`` ``decode``, anything else ``other``.

Without py-spy, threads other than the main one are ``unnamed``; process totals are exact anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("loop", "decode", "engine", "other", "unnamed")


def _ticks(stat: str) -> int:
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, task.read_text().split()):
                out += tree(child)
    return out


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return []


@dataclass
class Snapshot:
    """CPU seconds per process (all its threads) and per thread, of a process tree, at one time."""

    process: dict[int, float] = field(default_factory=dict)
    threads: dict[int, dict[int, float]] = field(default_factory=dict)

    @classmethod
    def take(cls, pid: int) -> Snapshot:
        snap = cls()
        for p in tree(pid):
            with contextlib.suppress(OSError, IndexError, ValueError):
                snap.process[p] = _ticks(Path(f"/proc/{p}/stat").read_text()) / TICK
                per = snap.threads[p] = {}
                for t in Path(f"/proc/{p}/task").iterdir():
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        per[int(t.name)] = _ticks((t / "stat").read_text()) / TICK
        return snap


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from ``py-spy dump --json`` ({} without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    try:
        out = subprocess.run([spy, "dump", "--json", "--pid", str(pid)], capture_output=True, timeout=30)
        return {t["os_thread_id"]: t["thread_name"] or "" for t in json.loads(out.stdout)}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return {}


def names_of(pid: int) -> dict[int, dict[int, str]]:
    """Thread names of every Python process of the tree."""
    return {p: thread_names(p) for p in tree(pid)}


def _is_engine_process(pid: int) -> bool:
    argv = cmdline(pid)
    return any(a.endswith("supervisor") and argv[i + 1 : i + 2] == ["engine"] for i, a in enumerate(argv))


def _comm(pid: int, tid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return ""


def role(pid: int, tid: int, names: dict[int, str], engine_process: bool) -> str:
    if engine_process:
        return "engine"
    name = names.get(tid)
    holds_engine = any(n.startswith("mtserve-engine") for n in names.values())
    if name is None:  # a native thread: onnxruntime's pool in a process holding the engine, or uvloop's
        if tid == pid:
            return "loop"
        if not names:
            return "unnamed"
        return "engine" if holds_engine and not _comm(pid, tid).startswith("libuv") else "other"
    if name.startswith("mtserve-engine"):
        return "engine"
    if name == "MainThread":
        return "loop"
    return "decode" if "-decode" in name else "other"


def by_role(before: Snapshot, after: Snapshot, names: dict[int, dict[int, str]]) -> dict[str, float]:
    """CPU seconds spent between the snapshots, per role, and ``front``: everything but the engine
    (the threads that exited in between are counted, from the process totals, as ``other``)."""
    out = dict.fromkeys(ROLES, 0.0)
    front = 0.0
    for p, total in after.process.items():
        engine_process = _is_engine_process(p)
        spent = total - before.process.get(p, 0.0)
        seen = 0.0
        for tid, secs in after.threads.get(p, {}).items():
            d = secs - before.threads.get(p, {}).get(tid, 0.0)
            r = role(p, tid, names.get(p, {}), engine_process)
            out[r] += d
            seen += d
            if r == "engine":
                spent -= d
        out["engine" if engine_process else "other"] += max(0.0, total - before.process.get(p, 0.0) - seen)
        front += 0.0 if engine_process else spent
    out["front"] = front
    return out
