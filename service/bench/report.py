"""Write a scenario's result: ``NAME.json`` (with the machine), ``NAME.md`` (a table), ``NAME.png``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` taken from each row (missing -> empty)."""
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}:{x}" for k, x in v.items())
    return str(v)


def write(
    out: Path, name: str, result: dict, md: str, plot: Callable[[object], None] | None = None
) -> list[Path]:
    """Write the three files; ``plot(ax)`` draws on one matplotlib axes. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result.get("machine", {})
    footer = (
        f"\n_{m.get('cpu_model', '?')}, {m.get('usable_cpus', '?')} usable CPUs, load average "
        f"{m.get('loadavg', '?')} at start, onnxruntime {m.get('versions', {}).get('onnxruntime', '?')}, "
        f"{m.get('provider', '?')}; GPU: {m.get('gpu', '?')}._\n"
    )
    paths[1].write_text(f"### {result.get('title', name)}\n\n{md}{footer}")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
        plot(ax)
        ax.set_title(result.get("title", name), fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def curves(ax, series: dict[str, Sequence[dict]], target_ms: float | None = None) -> None:
    """Latency-throughput curves: p99 (solid) and p50 (dotted) against achieved requests/s."""
    for label, points in series.items():
        pts = sorted(points, key=lambda p: p["throughput_rps"])
        x = [p["throughput_rps"] for p in pts]
        (line,) = ax.plot(x, [p["p99_ms"] for p in pts], "o-", label=f"{label} p99")
        ax.plot(x, [p["p50_ms"] for p in pts], ":", color=line.get_color(), label=f"{label} p50")
    if target_ms:
        ax.axhline(target_ms, color="grey", ls="--", lw=1, label=f"p99 target {target_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=7)


def bars(ax, labels: Sequence[str], values: Sequence[float], ylabel: str) -> None:
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=15)
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.3g}" if v < 100 else f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(ylabel)
