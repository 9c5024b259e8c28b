"""Build the bundles `mtserve bench` measures (random weights: timing and memory do not depend on them).

- ``bundles/bench/r50-mt16``: resnet50 at 224 px, plan ``bottom:1``, 16 tasks of 10 classes
  (16 stems, one shared trunk, 16 heads): P1/P2/P3/P5 for the compute-bound model.
- ``bundles/bench/r50-single/tNN``: the same backbone as N independent single-task bundles
  (plan ``independent``: the whole network is the task's own): the P3 baseline.
- ``bundles/bench/demo8``: the demo architecture (resnet10t at 32 px, ``bottom:2``) with 8 tasks:
  P2 needs 8 tasks and the trained demo bundle has 3.

    .venv/bin/python scripts/make_bench_bundles.py [--out bundles/bench] [--tasks 16] [--singles 16]

Existing bundles are kept (delete a folder to rebuild it). Needs the ``train`` extra (torch, timm).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center"}
R50_INPUT = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.95, **IMAGENET}
DEMO_INPUT = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, **IMAGENET}


def build(out: Path, backbone: str, tasks: list[str], plan: str, data_config: dict, seed: int) -> None:
    """Export one random-weight MultiTaskNet bundle into ``out`` unless it is already there."""
    if (out / "manifest.json").exists():
        print(f"keep {out}")
        return
    import torch

    from models.network import MultiTaskNet
    from training.export import export_network

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = MultiTaskNet(backbone, dict.fromkeys(tasks, 10), plan)
    labels = {t: [f"{t}_class{i}" for i in range(10)] for t in tasks}
    export_network(
        net, out, labels=labels, data_config=data_config, name=out.name, version="1", log=lambda *_: None
    )
    print(f"built {out} ({backbone}, {plan}, {len(tasks)} tasks) in {time.perf_counter() - t0:.0f} s")


def derive(src: Path, out: Path, seed: int) -> None:
    """A copy of the single-task bundle ``src`` for another task, its weights re-drawn (numpy + onnx).

    Exporting resnet50 through torch takes about a minute per model on 2 cores; the architecture,
    file sizes and therefore memory are identical, only the (random) weights differ.
    """
    if (out / "manifest.json").exists():
        print(f"keep {out}")
        return
    import hashlib
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    old, new = src.name, out.name
    rng = np.random.default_rng(seed)
    manifest = json.loads((src / "manifest.json").read_text().replace(old, new))
    for seg in manifest["segments"]:
        for variant in seg["variants"].values():
            model = onnx.load(str(src / variant["file"].replace(new, old)))
            for init in model.graph.initializer:
                w = numpy_helper.to_array(init)
                if w.dtype == np.float32 and w.size > 1:
                    w = (w * rng.uniform(0.9, 1.1, w.shape)).astype(np.float32)
                    init.CopyFrom(numpy_helper.from_array(w, init.name))
            path = out / variant["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(path))
            variant["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"derived {out} from {src}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bundles/bench")
    p.add_argument("--tasks", type=int, default=16, help="tasks of the resnet50 bottom:1 bundle")
    p.add_argument("--singles", type=int, default=16, help="independent single-task resnet50 bundles")
    p.add_argument("--only", choices=["demo8", "r50-mt", "r50-single"], action="append")
    args = p.parse_args()
    out = Path(args.out)
    want = set(args.only or ["demo8", "r50-mt", "r50-single"])
    if "demo8" in want:
        build(out / "demo8", "resnet10t", [f"t{i}" for i in range(8)], "bottom:2", DEMO_INPUT, 0)
    if "r50-mt" in want:
        tasks = [f"t{i:02d}" for i in range(args.tasks)]
        build(out / f"r50-mt{args.tasks}", "resnet50", tasks, "bottom:1", R50_INPUT, 0)
    if "r50-single" in want:
        first = out / "r50-single" / "t00"
        build(first, "resnet50", ["t00"], "independent", R50_INPUT, 0)
        for i in range(1, args.singles):
            derive(first, out / "r50-single" / f"t{i:02d}", i)


if __name__ == "__main__":
    main()
