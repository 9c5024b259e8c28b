"""Reduced-precision bundles on the server (docs/precision.md): which file precision runs where.

- ``int8`` (onnxruntime static quantization, QDQ) runs on every provider; on the CPU it is fast
  where the cores have VNNI or AMX (the engine's ``ORT_ENABLE_ALL`` fuses the QDQ pairs into
  integer kernels), and still correct, if slower, where they do not.
- ``fp16`` files are for CUDA: onnxruntime's CPU provider has no fast float16 kernels (it runs them
  slower than float32, or falls back through casts), so a session that does not run on
  ``CUDAExecutionProvider`` is refused with a message that says what to serve instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from contract.errors import BundleError
from contract.host import cpu_flags
from contract.manifest import VariantSpec

CUDA = "CUDAExecutionProvider"
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx2")


def check_precision(spec: VariantSpec, providers: Sequence[str], path: str | Path) -> None:
    """Raise :class:`BundleError` if the session of ``path`` cannot serve its precision.

    ``providers``: what the session actually runs on (``session.get_providers()``): onnxruntime-gpu
    without a usable GPU silently falls back to the CPU, so the requested device is not enough.
    """
    if spec.precision == "fp16" and CUDA not in providers:
        raise BundleError(
            f"{path}: an fp16 file (manifest precision fp16) needs the CUDA execution provider, but this "
            f"session runs on {', '.join(providers) or 'no provider'}: serve the fp32 or int8 bundle on "
            "the CPU, or this one with --device cuda (onnxruntime-gpu and a GPU)"
        )


def int8_flags(flags: set[str] | None = None) -> dict[str, bool]:
    """The flags that decide INT8 speed on x86 (VNNI / AMX: 8-bit dot products; AVX2: the fallback)."""
    flags = cpu_flags() if flags is None else flags
    return {f: f in flags for f in INT8_CPU_FLAGS}
