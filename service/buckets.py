"""Batch buckets: every (segment, variant) call runs at one of a few fixed batch sizes.

onnxruntime's CUDA convolutions keep the cuDNN plan of their last input shape only and rebuild it
whenever the batch size changes; a captured CUDA graph replays one shape only. Grouping a batch's
rows by variant gives every call its own row count, so the engine pads each call's rows up to a
**bucket** (the smallest bucket that holds them; the padded rows are computed and dropped) and
keeps one shape state per (variant, bucket). Pure functions, no onnxruntime: unit-tested alone.

Settings (``--batch-buckets`` / ``MTSERVE_BATCH_BUCKETS``):

- ``auto`` (default): powers of two up to ``max_batch_size`` (and ``max_batch_size`` itself) on
  CUDA; off on the CPU, where padding only adds work (measured: docs/bench.md, "Batch buckets").
- ``pow2``: powers of two up to ``max_batch_size`` on every device.
- ``off``: no padding, every call at its own size.
- ``1,2,4,8,16,32``: these sizes (a call with more rows than the largest is split into chunks).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

Buckets = tuple[int, ...]


def default_buckets(max_batch_size: int) -> Buckets:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself: 24 -> (1, 2, 4, 8, 16, 24)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    out.append(max_batch_size)
    return tuple(out)


def parse_buckets(text: str) -> Buckets:
    """``"1,2,4, 8"`` -> (1, 2, 4, 8): sorted, distinct, every size >= 1; ValueError names the bad item."""
    sizes = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            size = int(item)
        except ValueError:
            raise ValueError(f"batch bucket {item!r} is not an integer") from None
        if size < 1:
            raise ValueError(f"batch bucket {size} must be >= 1")
        sizes.add(size)
    if not sizes:
        raise ValueError(f"no batch bucket in {text!r}")
    return tuple(sorted(sizes))


MODES = ("auto", "pow2", "off")


def check_spec(spec: str) -> str:
    """Validate a ``--batch-buckets`` value (a mode or a list); returns it normalised."""
    spec = spec.strip().lower()
    if spec in MODES:
        return spec
    return ",".join(map(str, parse_buckets(spec)))


def resolve(spec: str, max_batch_size: int, device: str) -> Buckets | None:
    """The buckets a ``--batch-buckets`` value means on ``device``; None: no padding."""
    spec = check_spec(spec)
    if spec == "off" or (spec == "auto" and device != "cuda"):
        return None
    if spec in ("auto", "pow2"):
        return default_buckets(max_batch_size)
    return parse_buckets(spec)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows`` rows (``rows`` <= the largest bucket)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}; split them with chunks()")


def chunks(rows: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ``rows`` rows into calls: ``(start, count, bucket)`` each, count <= bucket.

    Full chunks of the largest bucket first, then the rest padded to its smallest bucket:
    70 rows over (1, 2, 4, 8, 16, 32) -> (0, 32, 32), (32, 32, 32), (64, 6, 8).
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    largest = buckets[-1]
    out = []
    start = 0
    while rows - start > largest:
        out.append((start, largest, largest))
        start += largest
    if rows > start:
        out.append((start, rows - start, bucket_for(rows - start, buckets)))
    return out


def padded_rows(rows: int, buckets: Sequence[int] | None) -> int:
    """Rows actually computed for a call of ``rows`` rows (``rows`` itself without buckets)."""
    if not buckets:
        return rows
    return sum(b for _, _, b in chunks(rows, buckets))


def copy_runs(
    where: Sequence[tuple[Hashable, int]], rows: Sequence[int]
) -> list[tuple[Hashable, int, int, int]]:
    """Gather ``rows`` (in this order) into one contiguous buffer with as few copies as possible.

    ``where[r]`` is ``(buffer, index)``: where row ``r`` lives now (the output of the previous
    segment's call that computed it). Returns ``(buffer, src_index, dst_index, count)`` copies:
    consecutive rows that are consecutive in the same source buffer make one copy.
    """
    out: list[tuple[Hashable, int, int, int]] = []
    for dst, r in enumerate(rows):
        buf, idx = where[r]
        if out:
            pbuf, psrc, pdst, n = out[-1]
            if pbuf == buf and psrc + n == idx and pdst + n == dst:
                out[-1] = (pbuf, psrc, pdst, n + 1)
                continue
        out.append((buf, idx, dst, 1))
    return out
