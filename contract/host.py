"""Facts about the host that the trainer's tools and the server must read the same way: the CPUs this
process may use (affinity, capped by a cgroup v2 quota) and the CPU's features that decide how INT8
files are made (``reduce_range`` without VNNI/AMX) and how fast they run."""

from __future__ import annotations

import os
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit dot products without saturation


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota if any."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where unknown (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """8-bit dot products in hardware (VNNI or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)
