"""Per-image validation predictions of a finished run (issue 15): ``predictions.npz``.

For every task, ``<task>.pred`` (predicted class per val image, in the val set's sorted file order),
``<task>.true`` (its label) and ``<task>.files`` (sha1 of the val file list, so two runs are only
paired image by image when they saw the same images in the same order). Paired tests over plans
(McNemar, paired bootstrap) read these; ``results.json`` keeps only accuracies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_list_digest(paths: list[str], root: str | Path) -> str:
    """sha1 of the val files' paths relative to the task root (independent of where the data lives)."""
    rel = "\n".join(str(Path(p).relative_to(root)) for p in paths)
    return hashlib.sha1(rel.encode()).hexdigest()


def val_predictions(run_dir: str | Path, which: str = "last", batch: int = 256) -> dict[str, np.ndarray]:
    """Predicted and true class of every val image of every task of the run in ``run_dir``."""
    import torch

    from training.config import AugmentConfig
    from training.imagefolder import load_image, load_task, transforms
    from training.run_files import load_run

    net, info = load_run(run_dir, which=which)
    dc = dict(info.data_config)
    dc["input_size"] = tuple(dc["input_size"])
    eval_tf = transforms(dc, AugmentConfig())[1]
    out: dict[str, np.ndarray] = {}
    for task, spec in info.config.train_config["tasks"].items():
        data = load_task(task, spec["root"])
        preds = []
        with torch.no_grad():
            for i in range(0, len(data.val), batch):
                x = torch.stack([eval_tf(load_image(p)) for p, _ in data.val[i : i + batch]])
                preds.append(net.forward_task(x, task).argmax(1).numpy())
        out[f"{task}.pred"] = np.concatenate(preds).astype(np.int16)
        out[f"{task}.true"] = np.asarray([y for _, y in data.val], np.int16)
        out[f"{task}.files"] = np.asarray(file_list_digest([p for p, _ in data.val], data.root))
    return out


def save_predictions(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray | str]]:
    """``{task: {"pred": int array, "true": int array, "files": digest}}``."""
    with np.load(path) as z:
        out: dict[str, dict[str, np.ndarray | str]] = {}
        for key in z.files:
            task, _, field = key.rpartition(".")
            value = z[key]
            out.setdefault(task, {})[field] = str(value) if field == "files" else value
    return out


def accuracy(preds: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 per task from a predictions mapping (to check against the trainer's own evaluation)."""
    tasks = sorted({k.rpartition(".")[0] for k in preds})
    return {t: float(np.mean(preds[f"{t}.pred"] == preds[f"{t}.true"])) for t in tasks}
