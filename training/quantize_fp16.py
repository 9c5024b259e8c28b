"""FP16 of one file: onnxruntime's float16 converter (the one onnxconverter-common ships, bundled with
onnxruntime as ``onnxruntime.transformers.float16``) with float32 inputs and outputs kept; checked
on CUDA where there is one."""

from __future__ import annotations

from pathlib import Path

FP16_METHOD = {  # the manifest's ``reduced_precision.method`` entries of an fp16 bundle
    "convert": "onnxruntime.transformers.float16.convert_float_to_float16",
    "keep_io_types": True,
}


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def fp16_providers() -> list[str]:
    """Where the fp16 bundle is checked: CUDA first if onnxruntime has it, else the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
