"""``summary.md`` / ``summary.json``: every P target of issue 5, measured value against the goal."""

from __future__ import annotations

import json
from pathlib import Path

from service.bench.machine import describe
from service.bench.report import table

# (target, result key, figure key, goal text, check)
TARGETS = [
    ("P1 /v2 tensor", "overhead-demo", "P1_tensor", ">= 0.6", lambda v: v >= 0.6),
    ("P1 /predict JPEG", "overhead-demo", "P1_jpeg", ">= 0.6", lambda v: v >= 0.6),
    ("P1 /v2 tensor", "overhead-r50", "P1_tensor", ">= 0.95", lambda v: v >= 0.95),
    ("P1 /predict JPEG", "overhead-r50", "P1_jpeg", ">= 0.95", lambda v: v >= 0.95),
    ("P2 uniform, 8 clients (1 per task)", "cross-task-demo", "P2_uniform_closed", ">= 2", lambda v: v >= 2),
    ("P2 uniform, at p99 target", "cross-task-demo", "P2_uniform_at_p99", ">= 2", lambda v: v >= 2),
    ("P2 zipf, 8 clients", "cross-task-demo", "P2_zipf_closed", ">= 2", lambda v: v >= 2),
    ("P2 zipf, at p99 target", "cross-task-demo", "P2_zipf_at_p99", ">= 2", lambda v: v >= 2),
    ("P2 uniform, 8 clients (1 per task)", "cross-task-r50", "P2_uniform_closed", "(none on CPU)", None),
    ("P2 uniform, at p99 target", "cross-task-r50", "P2_uniform_at_p99", "(none on CPU)", None),
    ("P3 servers, 16 tasks", "memory-r50", "P3", "<= 0.15", lambda v: v <= 0.15),
    ("P4 at equal p99 target", "peer-demo", "P4_at_p99", ">= 1.3", lambda v: v >= 1.3),
    ("P4 closed loop saturation", "peer-demo", "P4_closed", "(context)", None),
]


def _p5_rows(results: dict) -> list[dict]:
    rows = []
    for key in ("idle-demo", "idle-r50"):
        for r in results.get(key, {}).get("rows", []):
            if r["route"].startswith("GET"):
                continue  # the HTTP floor: evidence, not a target
            v = r["overhead_p50_ms"]
            rows.append(
                {
                    "target": f"P5 {r['route']}, max_wait_ms={r['max_wait_ms']:g}"
                    + (f", workers={r['workers']}" if r.get("workers", "auto") != "auto" else ""),
                    "model": key[5:],
                    "measured": f"{v:.2f} ms",
                    "goal": "<= 2 ms",
                    "met": "yes" if v <= 2 else "no",
                }
            )
    return rows


def _p6_row(out: Path) -> list[dict]:
    path = out / "train.json"
    if not path.exists():
        return [{"target": "P6 trainer", "model": "demo", "measured": "not run", "goal": "", "met": ""}]
    data = json.loads(path.read_text())
    ratio = float(data.get("ratio", float("nan")))
    row = {"target": "P6 trainer / plain torch loop", "model": "demo", "measured": f"{ratio:.3f}"}
    return [row | {"goal": ">= 0.9", "met": "yes" if ratio >= 0.9 else "no"}]


def write_summary(out: Path, results: dict, seconds: float) -> None:
    rows = []
    for target, key, fig, goal, check in TARGETS:
        if key not in results:
            continue
        v = results[key].get("figure", {}).get(fig)
        met = "" if check is None or v is None else ("yes" if check(v) else "no")
        rows.append(
            {
                "target": target,
                "model": key.rsplit("-", 1)[1],
                "measured": "n/a" if v is None else f"{v:.3g}",
                "goal": goal,
                "met": met,
            }
        )
    rows += _p5_rows(results) + _p6_row(out)
    machine = describe()
    took = None if seconds != seconds else round(seconds)  # NaN: rebuilt from the files
    (out / "summary.json").write_text(
        json.dumps({"machine_at_end": machine, "seconds": took, "targets": rows}, indent=2) + "\n"
    )
    md = table(rows, ["target", "model", "measured", "goal", "met"])
    how = (
        f"`mtserve bench all` took {seconds / 60:.1f} min"
        if took is not None
        else "rebuilt from the JSON files"
    )
    md += (
        f"\n_{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, load average at the end "
        f"{machine['loadavg']}; {how}. GPU figures: results/bench-gpu/ (`--device cuda`)._\n"
    )
    (out / "summary.md").write_text("### Targets of issue 5\n\n" + md)
