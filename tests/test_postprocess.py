"""softmax_rows: one vectorised softmax per width of row, each row's answer as if computed alone."""

from __future__ import annotations

import numpy as np
import pytest

from service.postprocess import softmax_rows


def alone(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64)
    z = np.exp(z - z.max())
    return np.nan_to_num(z / z.sum(), nan=0.0).astype(np.float32)


def test_rows_of_mixed_widths_keep_their_order_and_values():
    rng = np.random.default_rng(0)
    widths = [10, 3, 10, 7, 3, 10, 1]
    logits = [rng.normal(size=w).astype(np.float32) * 5 for w in widths]
    out = softmax_rows(logits)
    assert [len(p) for p in out] == widths
    for row, p in zip(logits, out, strict=True):
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, alone(row))


def test_one_width_is_one_call_with_the_same_answers():
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=10).astype(np.float32) for _ in range(17)]
    out = softmax_rows(logits)
    assert all(np.array_equal(p, alone(row)) for row, p in zip(logits, out, strict=True))
    assert np.allclose(np.sum(out, axis=1), 1.0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_non_finite_logits_give_no_nan_and_spare_the_other_rows():
    logits = [np.array([np.inf, 0.0, 1.0], np.float32), np.array([np.nan, 1.0, 2.0], np.float32),
              np.array([0.0, 1.0, 2.0], np.float32)]  # fmt: skip
    out = softmax_rows(logits)
    assert not any(np.isnan(p).any() for p in out)
    np.testing.assert_array_equal(out[2], alone(logits[2]))


def test_no_rows():
    assert softmax_rows([]) == []
