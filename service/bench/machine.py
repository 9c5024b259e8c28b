"""Describe the machine a result was measured on (every JSON carries it)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from contract.host import available_cpus

PACKAGES = ("mtserve", "onnxruntime", "numpy", "fastapi", "uvicorn", "pillow", "litserve", "httptools")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        for dist in (name, f"{name}-gpu"):  # onnxruntime-gpu provides the onnxruntime module
            try:
                out[name] = version(dist) + ("" if dist == name else " (gpu)")
                break
            except PackageNotFoundError:
                out[name] = "not installed"
    return out


def gpu_name() -> str:
    """The GPU as nvidia-smi names it (name, driver, memory), or why none is named."""
    try:
        q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        return subprocess.run(q, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi unavailable"


def describe(device: str = "cpu") -> dict:
    """CPU model, cores (host and usable), load averages now, provider, GPU, package versions, time."""
    cuda = device == "cuda"
    return {
        "cpu_model": cpu_model(),
        "host_cpus": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "provider": "CUDAExecutionProvider (IOBinding)" if cuda else "CPUExecutionProvider",
        "gpu": gpu_name() if cuda else "not used (CPU run)",
        "platform": platform.platform(),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_SPIN = "\n".join(
    [
        "import time",
        "t = time.process_time()",
        "s = 0",
        "for i in range(2_000_000): s += i",
        "print(time.process_time() - t)",
    ]
)


def _spin(n: int) -> list[float]:
    """CPU seconds of a fixed pure-Python loop, in ``n`` processes run at once."""
    cmd = [sys.executable, "-c", _SPIN]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [float(p.communicate(timeout=120)[0]) for p in procs]


def contention() -> dict:
    """How much CPU time a fixed loop takes alone and with a twin on another CPU (median of 3 each):
    on these shared vCPUs the pair ran 1.0x-1.7x slower per loop at different times of one session,
    and CPU-time figures of servers with a busy second thread (the engine) inflate with it. Recorded
    beside figures that divide CPU time by requests, to read them against the machine's state.
    ``pair_capacity``: the work two busy CPUs do in units of one CPU alone (2 / slowdown): what any
    two processes, API workers included, can get out of the pair at that time."""
    alone = statistics.median(_spin(1)[0] for _ in range(3))
    pair = statistics.median(max(_spin(2)) for _ in range(3))
    return {
        "loop_alone_s": round(alone, 3),
        "loop_in_pair_s": round(pair, 3),
        "slowdown": round(pair / alone, 2),
        "pair_capacity": round(2 * alone / pair, 2),
    }
