"""onnxruntime set-up shared by the engine's paths: one CPU arena for every session, a one-node
row-copy model for device-to-device copies, memory readings (resident, CUDA device)."""

from __future__ import annotations

import ctypes
import os
import threading

_shared_arena_lock = threading.Lock()
_shared_arena = False


def register_shared_cpu_arena() -> None:
    """One CPU memory arena for every session of the process (onnxruntime's environment allocator).

    By default each session keeps its own arena, grown to its own peak and never shrunk: a bundle
    with 16 stems, a trunk and 16 heads holds 33 of them (resnet50 at 224 px: 1,157 MiB after warm-up
    at batch 1 and 8). Sessions run one at a time on the engine thread, so one arena sized by the
    largest single call serves them all (465 MiB, same throughput; ``enable_cpu_mem_arena=False``
    gave 784 MiB and lost throughput). Registered once per process; later engines (a reloaded
    bundle) share it.
    """
    global _shared_arena
    import onnxruntime as ort

    with _shared_arena_lock:
        if _shared_arena:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int | str) -> bytes:
    """One protobuf field: varint for int, length-delimited for bytes/str."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def copy_model_bytes() -> bytes:
    """A one-node ONNX model ``y = Identity(x)``, x float32 ``[n, d]`` (both axes free).

    Written as protobuf by hand (the serving install has no ``onnx``). Run with IOBinding to raw
    pointers it copies ``n`` rows from one buffer to another on the device, without the host:
    how rows reach the bound input of a (segment, variant, bucket) from the previous segment.
    """

    def tensor_value(name: str) -> bytes:
        dims = _field(1, _field(2, "n")) + _field(1, _field(2, "d"))  # dim { dim_param }
        tensor = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # ValueInfo { name, type { tensor_type } }

    node = _field(1, "x") + _field(2, "y") + _field(3, "copy") + _field(4, "Identity")
    graph = (
        _field(1, node) + _field(2, "rowcopy") + _field(11, tensor_value("x")) + _field(12, tensor_value("y"))
    )
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)  # ir_version 8, graph, opset_import


def rss_bytes() -> int | None:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_cudart = None


def device_memory_used(device_id: int) -> int | None:
    """Bytes in use on the CUDA device (all processes: cudaMemGetInfo), None when unknown."""
    global _cudart
    if _cudart is None:
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                _cudart = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            _cudart = False
    if not _cudart:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if _cudart.cudaSetDevice(device_id) != 0 or _cudart.cudaMemGetInfo(
        ctypes.byref(free), ctypes.byref(total)
    ):
        return None
    return total.value - free.value
