"""onnxruntime sessions of a bundle's files, run along one task's path: the fp32 reference feeds the
calibration and both bundles run in the accuracy check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.bundle import Bundle


class OrtChain:
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

    def input_name(self, segment: str, variant: str) -> str:
        return self.sessions[(segment, variant)].get_inputs()[0].name

    def run(self, task: str, x: np.ndarray, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
        """The outputs of segments ``start .. stop-1`` of ``task``'s path, ``x`` entering ``start``."""
        outs = []
        variants = self.bundle.manifest.tasks[task].variants
        for name in self.segments[start:stop]:
            sess = self.sessions[(name, variants[name])]
            x = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            outs.append(x)
        return outs
