"""Post-processing, in one place: logits -> probabilities (softmax per row) -> answers (top-k for
``/predict``, the Open Inference Protocol's ``probabilities`` outputs for ``/v2``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.plan import group_rows

FULL_SORT_MAX = 128  # classes up to which one stable argsort costs less than partition + sort of k


def softmax_rows(logits: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Softmax per row (rows of one width stacked: one vectorised call per width, whatever their tasks:
    on the device's thread per batch); NaN-free; float32, as the engine process sends them with
    ``--workers N``, so an answer does not depend on the layout."""
    if not logits:
        return []
    first = len(logits[0])
    if all(len(row) == first for row in logits):  # the common case: every head of one width
        return list(_softmax(logits))
    out: list[np.ndarray] = [None] * len(logits)  # type: ignore[list-item]
    for _, rows in group_rows([len(row) for row in logits]):
        for r, p in zip(rows, _softmax([logits[r] for r in rows]), strict=True):
            out[r] = p
    return out


def _softmax(rows: Sequence[np.ndarray]) -> np.ndarray:
    z = np.array(rows, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)  # computed in float64, answered as float32


def top_indices(p: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``p`` [N, C] (NaN-free), the indices of its ``k`` largest values, largest first, ties
    by lower index: exactly ``np.argsort(-p, axis=1, kind="stable")[:, :k]``, but past a few classes
    for the price of a partition and a sort of ``k`` per row (the event loop computes it)."""
    n, c = p.shape
    k = min(k, c)
    if k == 1:
        return p.argmax(axis=1)[:, None]  # the first maximum
    if c <= FULL_SORT_MAX or k == c:
        return np.argsort(-p, axis=1, kind="stable")[:, :k]
    neg = -p
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]  # each row's k-th largest value
    better = neg < kth
    tied = neg == kth  # those taken: the lowest indices, as many as are needed to make k
    take = better | (tied & (np.cumsum(tied, axis=1) <= k - better.sum(axis=1, keepdims=True)))
    idx = np.nonzero(take)[1].reshape(n, k)  # ascending per row
    order = np.argsort(np.take_along_axis(neg, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """One row's ``k`` best classes as ``/predict`` answers them."""
    idx = top_indices(probs[None, :], k)[0].tolist()
    scores = probs.tolist()
    return [{"label": labels[i], "index": i, "score": scores[i]} for i in idx]


def v2_outputs(plan: list[int | None], probs: list[np.ndarray], labels: list[str]) -> list[dict]:
    """The ``/v2`` outputs: per requested output, the FP32 ``probabilities`` tensor (``None``) or
    Triton's ``classification`` extension with ``k`` entries ``"score:index:label"`` per row."""
    p = probs[0][None] if len(probs) == 1 else np.stack(probs)  # np.stack costs ~3 us per call
    p = p.astype(np.float32, copy=False)
    out = []
    for k in plan:
        if k is None:
            fp32 = {"name": "probabilities", "shape": list(p.shape), "datatype": "FP32"}
            out.append(fp32 | {"data": p.ravel().tolist()})
            continue
        idx = top_indices(p, k).tolist()
        rows = p.tolist()  # Python floats: the same "%f" text as numpy's float32, cheaper
        data = [f"{row[i]:f}:{i}:{labels[i]}" for row, top in zip(rows, idx, strict=True) for i in top]
        out.append(
            {"name": "probabilities", "shape": [p.shape[0], len(idx[0])], "datatype": "BYTES", "data": data}
        )
    return out
