"""INT8 of one file: onnxruntime's static quantization (``quantize_static``: QDQ format, per-channel
int8 weights, uint8 activations on x86, ``reduce_range`` where the CPU lacks VNNI/AMX, as its
docstring advises), after its ``quant_pre_process``; and what the manifest records of it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from training.quantize_calibration import CalibrationReader
from training.quantize_options import QuantizeOptions


def quantize_int8(
    src: Path, dst: Path, reader: CalibrationReader, options: QuantizeOptions, reduce_range: bool
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


def int8_method(options: QuantizeOptions, reduce_range: bool, vnni: bool) -> dict:
    """The manifest's ``reduced_precision.method`` entries of an int8 bundle."""
    return {
        "quantize": "quantize_static (after quant_pre_process)",
        "quant_format": "QDQ",
        "activation_type": options.activation_type,
        "weight_type": "int8",
        "per_channel": options.per_channel,
        "reduce_range": reduce_range,
        "calibrate_method": options.calibrate_method,
        "calibration_images": options.calibration_images,
        "calibration_split": "train",
        "vnni": vnni,
    }
