"""P6 into the bench results folder: run scripts/bench_train.py (the trainer's figure) and record it with
the machine (CPU, cores, load averages before and after, versions) as ``OUT/train.json`` + ``train.md``.

    .venv/bin/python scripts/bench_p6.py --out results/bench [-- extra bench_train.py flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bench.machine import describe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench")
    p.add_argument("extra", nargs="*", help="flags passed to bench_train.py (after --)")
    args = p.parse_args()
    before = describe()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "train.json"
        cmd = [sys.executable, str(ROOT / "scripts/bench_train.py"), "--json", str(raw), *args.extra]
        subprocess.run(cmd, check=True, cwd=ROOT)
        result = json.loads(raw.read_text())
    after = describe()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"scenario": "train", "title": "P6 trainer images/s vs a plain torch loop", "command": cmd[1:],
              "machine": before, "loadavg_after": after["loadavg"], **result}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "train.md").write_text(
        f"### P6 trainer\n\n| trainer images/s | plain loop images/s | ratio |\n| --- | --- | --- |\n"
        f"| {result['trainer_images_per_s']:.1f} | {result['plain_images_per_s']:.1f} "
        f"| {result['ratio']:.3f} |\n"
        f"\n_{before['cpu_model']}, {before['usable_cpus']} CPUs, load average {before['loadavg']} before, "
        f"{after['loadavg']} after; {result['config']} ({result['backbone']}, {result['plan']})._\n"
    )
    print(json.dumps({k: result[k] for k in ("trainer_images_per_s", "plain_images_per_s", "ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
