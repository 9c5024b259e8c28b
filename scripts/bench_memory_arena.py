"""Why the multi-task engine holds more than its weights: RSS of one engine process after warm-up with
onnxruntime's default per-session CPU arena, without the arena, without weight pre-packing, and with
one arena shared by every session (the engine's default since the P3 fix).

Each variant runs in a fresh process; writes ``OUT/memory-arena-<name>.json`` and ``.md``.

    .venv/bin/python scripts/bench_memory_arena.py bundles/bench/r50-mt16 --warmup 1,8 --out results/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "per-session arena (onnxruntime's default)": {"shared": False},
    "no CPU arena": {"arena": False, "shared": False},
    "no arena, no pre-packing": {"arena": False, "prepack": False, "shared": False},
    "one arena shared by all sessions (mtserve's default)": {},
}


def child(
    bundle: str,
    threads: int,
    warmup: list[int],
    arena: bool = True,
    prepack: bool = True,
    shared: bool = True,
) -> int:
    """Build and warm the engine with the given session options; return this process's RSS."""
    from contract.bundle import load_bundle
    from service.bench.server import rss_bytes
    from service.engine import OrtEngine

    class Engine(OrtEngine):
        def _options(self):
            so = super()._options()
            so.enable_cpu_mem_arena = arena
            if not prepack:
                so.add_session_config_entry("session.disable_prepacking", "1")
            return so

    engine = Engine(
        load_bundle(bundle, verify_sha256=False),
        threads=threads,
        warmup_batch_sizes=warmup,
        shared_cpu_arena=shared,
    )
    engine.start()
    import os

    return rss_bytes(os.getpid(), children=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--warmup", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    warm = [int(v) for v in args.warmup.split(",")]
    if args.child:
        print(child(args.bundle, args.threads, warm, **json.loads(args.child)))
        return
    from service.bench.machine import describe

    rows = []
    for name, opts in VARIANTS.items():
        cmd = [sys.executable, __file__, args.bundle, "--warmup", args.warmup, "--threads", str(args.threads)]
        out = subprocess.run([*cmd, "--child", json.dumps(opts)], capture_output=True, text=True, check=True)
        rows.append({"session options": name, "rss_mib": round(int(out.stdout.split()[-1]) / 2**20, 1)})
        print(rows[-1], flush=True)
    from service.bench.report import table

    stem = f"memory-arena-{Path(args.bundle).name}"
    result = {"bundle": args.bundle, "warmup": warm, "machine": describe(), "rows": rows}
    (Path(args.out) / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"### Engine process RSS after warm-up at {warm}: {args.bundle}\n\n" + table(rows, list(rows[0]))
    (Path(args.out) / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
