"""Reduced-precision bundles (docs/precision.md): an fp32 bundle -> int8 (CPU) or fp16 (GPU).

INT8 is onnxruntime's static quantization (``quantize_static``: QDQ format, per-channel int8
weights, uint8 activations on x86, ``reduce_range`` where the CPU lacks VNNI/AMX, as its
docstring advises), after its ``quant_pre_process``. Each (segment, variant) file is calibrated on
what it sees in serving: images of the tasks that use it (a task's stem on that task's images, a
shared trunk on a mix of all its tasks), fed through the fp32 segments before it. FP16 is
onnxruntime's float16 converter (the one onnxconverter-common ships, bundled with onnxruntime as
``onnxruntime.transformers.float16``) with float32 inputs and outputs kept.

Then every task's validation images run through the fp32 bundle and the reduced one: top-1 of
each and their top-1 agreement go into the manifest, and a task that loses more than
``max_accuracy_drop`` points refuses the whole bundle (nothing is written).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.bundle import Bundle, load_bundle, sha256_file
from contract.errors import UserError
from contract.manifest import MANIFEST_FILE, Manifest, ReducedPrecision, TaskAccuracy, VariantSpec

PRECISIONS = ("int8", "fp16")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit dot products without saturation
CONFIG = "config.json"  # the training run's config, copied into the bundle by the exporter

log = logging.getLogger("mtserve.quantize")


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str = "int8"
    max_accuracy_drop: float = 1.0  # points of top-1, per task
    calibration_images: int = 128  # per (segment, variant), from the train split
    calibrate_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: on where the CPU lacks VNNI / AMX
    activation_type: str = "uint8"  # uint8 (x86, onnxruntime's advice) or int8 (ARM, GPU/TensorRT)
    keep_fp32: tuple[str, ...] = ()  # segments left in fp32
    max_eval_images: int | None = None  # per task, from the val split (None: all of it)
    batch_size: int = 64
    threads: int | None = None
    seed: int = 0


@dataclass
class _TaskData:
    name: str
    calibration: list[tuple[str, int]]
    val: list[tuple[str, int]]
    cache: dict[str, np.ndarray] = field(default_factory=dict)


# -- the machine ------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def _threads(options: QuantizeOptions) -> int:
    if options.threads:
        return options.threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- data ---------------------------------------------------------------------------------------
def resolve_data(bundle_root: Path, manifest: Manifest, data: Sequence[str] = ()) -> dict[str, Path]:
    """task -> ImageFolder root (``train/`` and ``val/``).

    ``data``: ``TASK=ROOT`` entries, or one ``ROOT`` holding a folder per task; what they leave out
    comes from the training run's config (``config.json``, copied into the bundle by the exporter).
    """
    roots: dict[str, Path] = {}
    config = bundle_root / CONFIG
    if config.is_file():
        import json

        train = json.loads(config.read_text()).get("train_config") or {}
        for task, spec in (train.get("tasks") or {}).items():
            if task in manifest.tasks and isinstance(spec, dict) and spec.get("root"):
                roots[task] = Path(spec["root"])
    for entry in data:
        task, sep, root = entry.partition("=")
        if sep:
            if task not in manifest.tasks:
                raise UserError(
                    f"--data {entry}: the bundle has no task {task!r} (tasks: {list(manifest.tasks)})"
                )
            roots[task] = Path(root)
        else:
            for t in manifest.tasks:
                if (Path(entry) / t).is_dir():
                    roots[t] = Path(entry) / t
    missing = [t for t in manifest.tasks if t not in roots]
    if missing:
        raise UserError(
            f"no data for task(s) {missing}: pass --data TASK=ROOT (an ImageFolder root with train/ and "
            f"val/) or --data ROOT (a folder per task); a bundle exported from a run names its data "
            f"in {CONFIG}"
        )
    return roots


def _load_tasks(
    manifest: Manifest, roots: Mapping[str, Path], options: QuantizeOptions
) -> dict[str, _TaskData]:
    from training.imagefolder import load_task

    rng = np.random.default_rng(options.seed)
    out = {}
    for task, root in roots.items():
        data = load_task(task, root)
        labels = list(manifest.tasks[task].labels)
        if list(data.classes) != labels:
            raise UserError(
                f"task {task!r}: the class folders under {root} {list(data.classes)[:6]} are not the "
                f"bundle's "
                f"labels {labels[:6]} (same names, same order)"
            )

        def sample(items, n):
            items = list(items)
            if n is None or n >= len(items):
                return items
            return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]

        out[task] = _TaskData(
            task, sample(data.train, options.calibration_images), sample(data.val, options.max_eval_images)
        )
    return out


def _eval_transform(manifest: Manifest) -> Callable:
    """timm's eval transform for the manifest's input spec: the trainer's validation, and what
    service/preprocess.py reproduces without torch."""
    from timm.data import create_transform

    spec = manifest.input
    return create_transform(
        input_size=tuple(spec.size),
        interpolation=spec.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        crop_pct=spec.crop_pct,
        crop_mode=spec.crop_mode,
    )


def _images(
    items: Sequence[tuple[str, int]], transform: Callable, cache: dict[str, np.ndarray]
) -> np.ndarray:
    from training.imagefolder import load_image

    rows = []
    for path, _ in items:
        if path not in cache:
            cache[path] = transform(load_image(path)).numpy()
        rows.append(cache[path])
    return np.stack(rows).astype(np.float32, copy=False)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- onnxruntime --------------------------------------------------------------------------------
class _Chain:
    """onnxruntime sessions of a bundle's files, run along one task's path (no batching of tasks)."""

    def __init__(self, bundle: Bundle, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.bundle = bundle
        self.segments = [s.name for s in bundle.manifest.segments]
        self.sessions = {}
        for seg in bundle.manifest.segments:
            for vid in seg.variants:
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
                so.log_severity_level = 3
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                path = str(bundle.path(seg.name, vid))
                self.sessions[(seg.name, vid)] = ort.InferenceSession(path, so, providers=list(providers))
        first = next(iter(self.sessions.values()))
        self.provider = first.get_providers()[0]

    def run(self, task: str, x: np.ndarray, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
        """The outputs of segments ``start .. stop-1`` of ``task``'s path, ``x`` entering ``start``."""
        outs = []
        variants = self.bundle.manifest.tasks[task].variants
        for name in self.segments[start:stop]:
            sess = self.sessions[(name, variants[name])]
            x = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            outs.append(x)
        return outs


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a generator of input batches."""

    def __init__(self, name: str, batches: Iterator[np.ndarray]):
        self.name, self._batches, self.rows = name, batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        if x is None:
            return None
        self.rows += len(x)
        return {self.name: x}

    def rewind(self) -> None:  # part of the protocol; each variant gets a fresh reader
        pass


def _calibration_batches(
    chain: _Chain, index: int, users: Sequence[str], tasks: Mapping[str, _TaskData], n: int, batch: int, tf
) -> Iterator[np.ndarray]:
    """Inputs of segment ``index`` for the tasks in ``users``, ``n`` images in all, split evenly."""
    share = math.ceil(n / len(users))
    for task in users:
        items = tasks[task].calibration[:share]
        for part in _batches(items, batch):
            x = _images(part, tf, tasks[task].cache)
            yield chain.run(task, x, 0, index)[-1] if index else x


def _quantize_int8(
    src: Path, dst: Path, reader: _Reader, options: QuantizeOptions, reduce_range: bool
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.calibrate_method]
    activation = QuantType.QUInt8 if options.activation_type == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="mtserve-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=options.per_channel,
            reduce_range=reduce_range,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options={"CalibTensorRangeSymmetric": False},
        )


def _convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


# -- accuracy -----------------------------------------------------------------------------------
def _evaluate(
    ref: _Chain, new: _Chain, tasks: Mapping[str, _TaskData], batch: int, tf
) -> tuple[dict[str, TaskAccuracy], dict[str, float]]:
    """Per task: top-1 of both bundles and their agreement; per segment: max |new - ref|."""
    accuracy: dict[str, TaskAccuracy] = {}
    diff = dict.fromkeys(ref.segments, 0.0)
    for task, data in tasks.items():
        right_ref = right_new = agree = 0
        for part in _batches(data.val, batch):
            x = _images(part, tf, {})
            labels = np.asarray([label for _, label in part])
            a, b = ref.run(task, x), new.run(task, x)
            for name, ya, yb in zip(ref.segments, a, b, strict=True):
                diff[name] = max(diff[name], float(np.max(np.abs(ya.astype(np.float32) - yb))))
            pa, pb = a[-1].argmax(1), b[-1].argmax(1)
            right_ref += int((pa == labels).sum())
            right_new += int((pb == labels).sum())
            agree += int((pa == pb).sum())
        n = len(data.val)
        top_ref, top_new = 100.0 * right_ref / n, 100.0 * right_new / n
        accuracy[task] = TaskAccuracy(
            images=n,
            top1_fp32=round(top_ref, 3),
            top1_reduced=round(top_new, 3),
            drop=round(top_ref - top_new, 3),
            agreement=round(100.0 * agree / n, 3),
        )
    return accuracy, {k: float(f"{v:.3g}") for k, v in diff.items()}


def check_accuracy(precision: str, accuracy: Mapping[str, TaskAccuracy], limit: float) -> None:
    """Raise :class:`UserError` (one line) if a task loses more than ``limit`` points of top-1."""
    worse = {t: a for t, a in accuracy.items() if a.drop > limit}
    if worse:
        parts = [
            f"{t} {a.top1_fp32:.2f}% -> {a.top1_reduced:.2f}% (-{a.drop:.2f} points, {a.images} val images)"
            for t, a in worse.items()
        ]
        raise UserError(
            f"{precision} bundle refused: {'; '.join(parts)} exceeds --max-accuracy-drop {limit:g}; nothing "
            "written (try --calibrate-method entropy or percentile, more --calibration-images, --keep-fp32 "
            "SEGMENT, or --precision fp16)"
        )


# -- the whole bundle ---------------------------------------------------------------------------
def quantize_bundle(
    src: str | Path,
    out: str | Path,
    options: QuantizeOptions = QuantizeOptions(),
    data: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> Manifest:
    """Write the reduced-precision bundle of the fp32 bundle ``src`` into ``out`` (absent or empty).

    Raises :class:`UserError` for bad arguments and for an accuracy drop over the limit (then
    ``out`` is left as it was).
    """
    src, out = Path(src), Path(out)
    if options.precision not in PRECISIONS:
        raise UserError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if options.calibrate_method not in CALIBRATE_METHODS:
        raise UserError(
            f"--calibrate-method {options.calibrate_method!r}: one of {', '.join(CALIBRATE_METHODS)}"
        )
    if options.max_accuracy_drop < 0:
        raise UserError(f"--max-accuracy-drop {options.max_accuracy_drop:g}: must be >= 0 (points of top-1)")
    if options.calibration_images < 1:
        raise UserError("--calibration-images must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder or remove it")
    bundle = load_bundle(src)
    manifest = bundle.manifest
    if manifest.precisions != {"fp32"}:
        raise UserError(
            f"{src} is already reduced ({', '.join(sorted(manifest.precisions))}): quantize its fp32 source"
        )
    unknown = [s for s in options.keep_fp32 if s not in {seg.name for seg in manifest.segments}]
    if unknown:
        raise UserError(
            f"--keep-fp32 {unknown}: the bundle's segments are {[s.name for s in manifest.segments]}"
        )

    flags = cpu_flags()
    reduce_range = (not has_vnni(flags)) if options.reduce_range is None else options.reduce_range
    threads = _threads(options)
    tasks = _load_tasks(manifest, resolve_data(src, manifest, data), options)
    tf = _eval_transform(manifest)
    ref = _Chain(bundle, threads)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        segments = []
        for index, seg in enumerate(manifest.segments):
            variants = {}
            for vid, spec in seg.variants.items():
                t0 = time.perf_counter()
                dst = work / spec.file
                dst.parent.mkdir(parents=True, exist_ok=True)
                srcfile = bundle.path(seg.name, vid)
                users = [t for t, ts in manifest.tasks.items() if ts.variants[seg.name] == vid]
                if seg.name in options.keep_fp32:
                    shutil.copy2(srcfile, dst)
                    precision, note = "fp32", "kept fp32"
                elif options.precision == "int8":
                    name = ref.sessions[(seg.name, vid)].get_inputs()[0].name
                    batches = _calibration_batches(
                        ref, index, users, tasks, options.calibration_images, options.batch_size, tf
                    )
                    reader = _Reader(name, batches)
                    _quantize_int8(srcfile, dst, reader, options, reduce_range)
                    precision, note = "int8", f"calibrated on {reader.rows} images of {', '.join(users)}"
                else:
                    _convert_fp16(srcfile, dst)
                    precision, note = "fp16", "float16, float32 inputs/outputs"
                variants[vid] = VariantSpec(
                    file=spec.file, sha256=sha256_file(dst), params=spec.params, precision=precision
                )
                kib = dst.stat().st_size / 1024
                say(
                    f"  {spec.file:40s} {precision}  {kib:9.0f} KiB  {note} "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
            segments.append(seg.model_copy(update={"variants": variants}))

        draft = manifest.model_copy(update={"segments": segments})
        providers = ["CPUExecutionProvider"]
        if options.precision == "fp16":
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        new = _Chain(Bundle(work, draft), threads, providers)
        accuracy, diff = _evaluate(ref, new, tasks, options.batch_size, tf)
        method: dict = {"tool": "onnxruntime " + _ort_version()}
        if options.precision == "int8":
            method |= {
                "quantize": "quantize_static (after quant_pre_process)",
                "quant_format": "QDQ",
                "activation_type": options.activation_type,
                "weight_type": "int8",
                "per_channel": options.per_channel,
                "reduce_range": reduce_range,
                "calibrate_method": options.calibrate_method,
                "calibration_images": options.calibration_images,
                "calibration_split": "train",
                "vnni": has_vnni(flags),
            }
        else:
            method |= {
                "convert": "onnxruntime.transformers.float16.convert_float_to_float16",
                "keep_io_types": True,
            }
        if options.keep_fp32:
            method["keep_fp32"] = list(options.keep_fp32)
        source_sha = sha256_file(src / MANIFEST_FILE)
        report = ReducedPrecision(
            precision=options.precision,
            source=f"{manifest.name} v{manifest.version} (manifest sha256 {source_sha})",
            method=method,
            eval_provider=new.provider,
            max_accuracy_drop=options.max_accuracy_drop,
            tasks=accuracy,
            max_abs_diff=diff,
        )
        for task, a in accuracy.items():
            say(
                f"  {task:16s} top-1 fp32 {a.top1_fp32:6.2f}%  {options.precision} {a.top1_reduced:6.2f}%  "
                f"drop {a.drop:+.2f}  agreement {a.agreement:6.2f}%  ({a.images} val images)"
            )
        check_accuracy(options.precision, accuracy, options.max_accuracy_drop)
        final = draft.model_copy(
            update={
                "version": f"{manifest.version}-{options.precision}",
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "parity": {},  # max |onnx - torch| no longer holds: see reduced_precision.max_abs_diff
                "reduced_precision": report,
            }
        )
        final = Manifest.model_validate(final.model_dump())  # re-validate the assembled manifest
        final.write(work)
        if (src / CONFIG).is_file():
            shutil.copy2(src / CONFIG, work / CONFIG)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
        load_bundle(out)  # the result reads back and verifies
        return final
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
