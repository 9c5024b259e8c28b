"""Overload: a real uvicorn server on 127.0.0.1 (tiny bundle, onnxruntime; the engine slowed to 4 ms per
row so that compute is the bottleneck, see service/bench/slow_serve.py), its capacity measured closed
loop, then an open loop at 5x that capacity for 10 s. Behaviour only: what the server answers, how its
memory behaves, whether it is healthy afterwards. ``scripts/bench_overload.py`` is the 20 s version
that reports the figures."""

from __future__ import annotations

import pytest

TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def figures(tiny_bundle) -> dict:
    from service.bench.overload import overload

    args = ("--queue-size", "64", "--timeout-ms", str(TIMEOUT_MS))
    return overload(
        tiny_bundle,
        seconds=10,
        factor=5,
        threads=1,
        capacity_s=2,
        server_args=args,
        max_batch_size=8,
        row_ms=4,
    )


def test_overload_sheds_with_429_and_answers_every_admitted_request(figures):
    f = figures
    codes = {int(c): n for c, n in f["codes"].items()}
    assert f["unfinished"] == 0, f  # every request was answered
    assert set(codes) <= {200, 429, 504}, f  # no 500, no 503, no transport error
    assert codes.get(429, 0) > 0 and codes.get(200, 0) > 0, f  # it was overloaded, and it kept serving
    # every 429: Retry-After and a JSON error body, well before the request timeout (shed by the
    # outermost layer, before routing and before the body is read)
    assert f["429_without_retry_after"] == 0 and f["429_without_json_error"] == 0, f
    assert f["429_p99_ms"] < TIMEOUT_MS / 10, f
    # every admitted request (200 or 504) is answered by its deadline, as the client measures it (the
    # server answers 504 at the deadline, even while computing; a little for the way there and back)
    assert f["admitted_max_ms"] < TIMEOUT_MS + 500, f
    # shedding does not starve the engine: it keeps serving at about its capacity
    assert f["served_rps"] > 0.5 * f["capacity_rps"], f


def test_overload_memory_stays_bounded_and_server_recovers(figures):
    f = figures
    # the queue is bounded (64 rows): memory must not grow with the 50,000 offered requests
    assert f["rss_peak_mib"] - f["rss_before_mib"] < 150, f
    assert f["readyz_after"] == 200, f
    assert set(f["codes_after"]) == {"200"}, f
