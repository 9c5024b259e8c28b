"""Build the bundles ``mtserve bench precision`` measures (docs/precision.md).

``resnet50`` at 224 px, plan ``bottom:1``, random weights, two tasks named and labelled after the
demo data's ``digits`` and ``animals`` (so the demo images calibrate it and the accuracy check
runs; with random weights its accuracies are chance, only its speed means anything), exported with
the exporter and quantized to int8 with ``mtserve quantize``::

    .venv/bin/python -m training.quantize_bench [--data data/demo] [--out bundles/bench/r50-mt2]

Existing bundles are kept (delete a folder to rebuild it). Needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

R50_INPUT = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.95,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_mode": "center",
}
TASKS = ("digits", "animals")


def build_r50(out: Path, data: Path, seed: int = 0) -> None:
    import torch

    from models.network import MultiTaskNet
    from training.export import export_network
    from training.imagefolder import load_task

    labels = {t: list(load_task(t, data / t).classes) for t in TASKS}
    torch.manual_seed(seed)
    net = MultiTaskNet("resnet50", {t: len(v) for t, v in labels.items()}, "bottom:1")
    export_network(net, out, labels=labels, data_config=R50_INPUT, name=out.name, version="1", log=print)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--out", type=Path, default=Path("bundles/bench/r50-mt2"))
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--max-eval-images", type=int, default=100)
    args = p.parse_args(argv)
    from training.quantize import QuantizeOptions, quantize_bundle

    if not (args.out / "manifest.json").exists():
        t0 = time.perf_counter()
        build_r50(args.out, args.data)
        print(f"built {args.out} in {time.perf_counter() - t0:.0f} s")
    int8 = args.out.with_name(args.out.name + "-int8")
    if not (int8 / "manifest.json").exists():
        t0 = time.perf_counter()
        options = QuantizeOptions(
            precision="int8",
            max_accuracy_drop=100.0,  # random weights: chance accuracy, only the speed is measured
            calibration_images=args.calibration_images,
            max_eval_images=args.max_eval_images,
            batch_size=16,
        )
        quantize_bundle(args.out, int8, options, data=[str(args.data)])
        print(f"built {int8} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
