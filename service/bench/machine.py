"""Describe the machine a result was measured on (every JSON carries it)."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from service.settings import available_cpus

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
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe(provider: str = "CPUExecutionProvider") -> dict:
    """CPU model, cores (host and usable), load averages now, provider, package versions, time."""
    return {
        "cpu_model": cpu_model(),
        "host_cpus": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "provider": provider,
        "gpu": "not measured (no GPU in this session)",
        "platform": platform.platform(),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
