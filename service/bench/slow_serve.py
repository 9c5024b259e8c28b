"""``mtserve serve`` with the engine slowed down by a fixed time per row: a compute-bound model, emulated.

Overload behaviour depends on where the bottleneck is. With a model whose compute dominates (the case
admission control exists for), shedding load costs far less than serving it; the small test bundles
compute in microseconds, so this wraps the real onnxruntime engine and sleeps ``--row-ms`` per row of
every batch (the GIL is released, as during a real onnxruntime call). Everything else is the real
server: uvicorn, routes, batcher, sessions.

    python -m service.bench.slow_serve --row-ms 4 BUNDLE --port 8000 [any mtserve serve flag]
"""

from __future__ import annotations

import sys
import time


class SlowEngine:
    """An engine that sleeps ``row_s`` per row before delegating to the real one."""

    def __init__(self, engine, row_s: float):
        self._engine, self.row_s = engine, row_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def infer(self, x, tasks):
        time.sleep(self.row_s * len(tasks))
        return self._engine.infer(x, tasks)


def main(argv: list[str]) -> int:
    row_ms = 0.0
    if argv[:1] == ["--row-ms"]:
        row_ms, argv = float(argv[1]), argv[2:]
    import service.app as app_module
    from service import cli

    build = app_module.build_engine

    def build_engine(*args, **kwargs):
        return SlowEngine(build(*args, **kwargs), row_ms / 1000.0)

    app_module.build_engine = build_engine
    return cli.main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
