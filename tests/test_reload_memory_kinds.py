"""service/bench/reload_memory.py: the growth by kind of page (anonymous, file-backed, shared memory)."""

from __future__ import annotations

import os

from service.bench import reload_memory as rm


def test_kinds_of_this_process():
    procs = rm.processes(os.getpid())
    k = rm.kinds(procs)
    assert set(k) == {"anon", "file", "shmem"} and k["anon"] > 0 and k["file"] > 0
    rss = rm.by_role(procs)["all"]
    assert abs(k["anon"] + k["file"] + k["shmem"] - rss) < 0.5  # RSS = the three kinds


def test_kinds_column_medians_or_dash():
    runs = [{"growth_kinds_mib": {"anon": a, "file": 0.1, "shmem": 0.0}} for a in (0.5, 0.7, 0.9)]
    assert rm._kinds(runs) == "+0.70 / +0.10 / +0.00"
    assert rm._kinds([*runs, {}]) == "-"
