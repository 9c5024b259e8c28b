"""The machine ``mtserve quantize`` runs on: CPU flags (VNNI / AMX decide ``reduce_range``) and threads.

``service/precision.py`` has its own copy of :func:`cpu_flags`: ``training/`` never imports
``service/``, and ``contract/`` holds the bundle contract, not facts about the host.
"""

from __future__ import annotations

import os
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit dot products without saturation


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def usable_threads(threads: int | None = None) -> int:
    """``threads`` if given, else the cores this process may run on."""
    if threads:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
