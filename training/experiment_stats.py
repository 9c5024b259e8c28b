"""Paired statistics for the plan comparison (issue 15): bottom vs top at one matched level.

- **paired t-test over seeds** on the mean accuracy over tasks (each seed pairs the two plans: same
  initial backbone, same data order); two-sided, df = seeds - 1 (``scipy.stats.ttest_rel``).
- **McNemar per task**, exact: on the val images, b = bottom right & top wrong, c = the reverse,
  summed over the paired seeds; p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]).
- **paired bootstrap CI** of the gap in mean accuracy: val images resampled with replacement per
  task (the same draw for both plans and every seed), gap = mean over tasks of the seed-averaged
  per-image difference; percentile interval.

Pure numpy/math except the t distribution (scipy, installed with scikit-learn).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """(t, two-sided p) of the paired differences a - b; None with fewer than 2 pairs or no spread."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return None
    sd = statistics.stdev(d)
    if sd == 0:
        return None
    from scipy import stats

    t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
    return t, float(2 * stats.t.sf(abs(t), len(d) - 1))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def discordant(bottom: Sequence[np.ndarray], top: Sequence[np.ndarray], true: np.ndarray) -> tuple[int, int]:
    """(b, c) summed over paired seeds: b = bottom right and top wrong, c = top right and bottom wrong."""
    b = c = 0
    for pb, pt in zip(bottom, top, strict=True):
        rb, rt = pb == true, pt == true
        b += int(np.sum(rb & ~rt))
        c += int(np.sum(rt & ~rb))
    return b, c


def bootstrap_gap(
    diffs: Mapping[str, np.ndarray], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(gap, low, high): ``diffs[task]`` is the per-image bottom-minus-top correctness averaged over
    seeds (values in [-1, 1]); the gap is the mean over tasks of each task's mean."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs.values()]))
    boots = np.zeros(n_boot)
    for d in diffs.values():
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].mean(axis=1)
    boots /= len(diffs)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)


def level_stats(
    preds: Mapping[str, Mapping[int, Mapping[str, Mapping]]], bottom: str, top: str, tasks: Sequence[str]
) -> dict:
    """McNemar per task and the bootstrap CI for one matched pair, from ``preds[plan][seed][task]``
    (``{"pred", "true", "files"}``); only seeds where both plans saw the same val files count."""
    seeds = sorted(
        s
        for s in set(preds.get(bottom, {})) & set(preds.get(top, {}))
        if all(preds[bottom][s][t]["files"] == preds[top][s][t]["files"] for t in tasks)
    )
    if not seeds:
        return {}
    mcnemar, diffs = {}, {}
    for t in tasks:
        true = np.asarray(preds[bottom][seeds[0]][t]["true"])
        pb = [np.asarray(preds[bottom][s][t]["pred"]) for s in seeds]
        pt = [np.asarray(preds[top][s][t]["pred"]) for s in seeds]
        b, c = discordant(pb, pt, true)
        mcnemar[t] = {"b": b, "c": c, "p": mcnemar_exact(b, c)}
        diffs[t] = np.mean([(x == true).astype(float) - (y == true) for x, y in zip(pb, pt, strict=True)], 0)
    gap, low, high = bootstrap_gap(diffs)
    return {"seeds": seeds, "mcnemar": mcnemar, "bootstrap": {"gap": gap, "low": low, "high": high}}


def stats_markdown(gaps: Sequence[Mapping], tasks: Sequence[str]) -> list[str]:
    """Markdown lines: per matched level the t-test, the bootstrap CI and McNemar per task."""
    if not gaps:
        return []
    lines = [
        "",
        "| matched level | t-test over seeds (t, p) | paired bootstrap 95% CI (points) | "
        + " | ".join(f"McNemar {t} (b/c, p)" for t in tasks)
        + " |",
        "| --- | --- | --- |" + " --- |" * len(tasks),
    ]
    for g in gaps:
        tt = g.get("ttest")
        cells = [f"{g['bottom']} vs {g['top']}", f"{tt[0]:+.2f}, p={tt[1]:.3g}" if tt else "n/a"]
        st = g.get("images") or {}
        boot = st.get("bootstrap")
        cells.append(
            f"{100 * boot['gap']:+.2f} [{100 * boot['low']:+.2f}, {100 * boot['high']:+.2f}]"
            if boot
            else "n/a"
        )
        for t in tasks:
            m = st.get("mcnemar", {}).get(t)
            cells.append(f"{m['b']}/{m['c']}, p={m['p']:.3g}" if m else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
