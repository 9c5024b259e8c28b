"""``metrics.csv`` of a run and its figure ``curves.png`` (loss and validation accuracy per task)."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """``metrics.csv``: one row per log interval; val columns filled at evaluations."""

    def __init__(self, path: Path, tasks: list[str], classes: dict[str, int], start_step: int):
        self.path = path
        self.columns = [
            "step",
            "lr",
            "loss",
            *[f"loss_{t}" for t in tasks],
            *[f"val_top1_{t}" for t in tasks],
        ]
        self.columns += [f"val_top5_{t}" for t in tasks if classes[t] >= 5] + [
            "val_mean_top1",
            "images_per_s",
        ]
        rows = []
        if start_step and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)

    def plot(self, out: Path, tasks: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for t in tasks:
            pts = [(int(r["step"]), float(r[f"loss_{t}"])) for r in rows if r[f"loss_{t}"]]
            ax1.plot(*zip(*pts, strict=True), label=t) if pts else None
            pts = [(int(r["step"]), float(r[f"val_top1_{t}"])) for r in rows if r[f"val_top1_{t}"]]
            ax2.plot(*zip(*pts, strict=True), marker="o", label=t) if pts else None
        ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss per task")
        ax2.set(xlabel="step", ylabel="val top-1", ylim=(0, 1), title="validation accuracy per task")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
