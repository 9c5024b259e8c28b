"""service/bench/reload_memory.py without servers: the bundles it reloads, the new files' size, the table."""

from __future__ import annotations

import json
import shutil

from service.bench import reload_memory as rm


def test_prepare_and_new_files(tiny_bundle, tmp_path):
    added = tmp_path / "added"
    shutil.copytree(tiny_bundle, added)
    manifest = json.loads((added / "manifest.json").read_text())
    variant = next(iter(manifest["segments"][0]["variants"].values()))
    variant["sha256"] = "0" * 64  # a file the first bundle does not have
    (added / "manifest.json").write_text(json.dumps(manifest))
    models = rm.prepare(tiny_bundle, added, tmp_path / "work")
    assert sorted(p.name for p in models.iterdir()) == ["added", "same", "v1"]
    same = json.loads((models / "same" / "manifest.json").read_text())
    v1 = json.loads((models / "v1" / "manifest.json").read_text())
    assert same["version"] == v1["version"] + "-same" and same["segments"] == v1["segments"]
    assert rm.new_files_bytes(models / "v1", models / "same") == 0
    assert rm.new_files_bytes(models / "v1", models / "added") == (added / variant["file"]).stat().st_size


def test_table_medians_over_repetitions():
    def run(growth: float, api: float = 0.0) -> dict:
        rss = {"all": 100.0, "engine": 60.0, "api": 40.0}
        return {
            "workers": 1,
            "heap": "both",
            "reload": "added",
            "before": [{"rss_mib": rss}],
            "growth_mib": {"all": growth + api, "engine": growth, "api": api},
            "drift_mib": {"all": 0.0},
        }

    result = {"new_files_bytes": 2**20, "runs": [run(0.5), run(1.5, 0.5), run(0.7)]}
    row = rm.table(result).splitlines()[2]
    assert row.startswith(
        "| 1 | both | added | 3 | 100.0 (60.0) | +0.70 (+0.50 .. +2.00) | +0.70 (+0.50 .. +1.50)"
    )
    assert row.endswith("| 0.7 (0.5 .. 2.0)x |")


def test_processes_names_roles():
    import os

    procs = rm.processes(os.getpid())
    assert procs[os.getpid()][0] == "server" and procs[os.getpid()][1] > 0
