"""Build the bundles of the tasks-scaling scenario: the same backbone with 1, 10 and 100 tasks.

resnet10t at 32 px (the demo architecture), plan ``bottom:1`` (one stem and one head per task, one
shared trunk), random weights (timing and memory do not depend on them), 10 classes per task.
Every bundle goes through the real exporter (``training.export.export_network``: dynamo export and
parity check of every variant).

    .venv/bin/python scripts/make_scaling_bundles.py [--out bundles/bench] [--tasks 1,10,100]

Writes ``OUT/scale-t1``, ``OUT/scale-t10``, ``OUT/scale-t100``; existing bundles are kept. Needs the
``train`` extra (torch, timm). About 1 s per exported variant on 2 cores (100 tasks: 201 files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_bench_bundles import DEMO_INPUT, build

BACKBONE = "resnet10t"
PLAN = "bottom:1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bundles/bench")
    p.add_argument("--tasks", default="1,10,100", help="comma list of task counts")
    args = p.parse_args()
    for n in (int(s) for s in args.tasks.split(",")):
        tasks = [f"t{i:03d}" for i in range(n)]
        build(Path(args.out) / f"scale-t{n}", BACKBONE, tasks, PLAN, DEMO_INPUT, 0)


if __name__ == "__main__":
    main()
