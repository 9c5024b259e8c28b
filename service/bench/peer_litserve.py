"""The P4 peer: LitServe serving the same ONNX chain with its own batching.

Run as ``python -m service.bench.peer_litserve BUNDLE --port N``. ``POST /predict`` with JSON
``{"task": ..., "image": base64}``; the same onnxruntime runner (service.engine.OrtEngine), the
same preprocessing and softmax as mtserve, so only the serving layer differs. LitServe collects up to
``--max-batch-size`` requests or ``--batch-timeout-ms``, whatever their task, then runs one batch.
"""

from __future__ import annotations

import argparse

import numpy as np

try:
    import litserve as ls

    _Base = ls.LitAPI
except ImportError:  # the bench extra is not installed: the peer scenario says so and is skipped
    ls = None
    _Base = object


class OnnxChainAPI(_Base):
    """LitServe API over the bundle (module level: LitServe pickles it into its worker process)."""

    def __init__(self, bundle: str, threads: int, max_batch_size: int, batch_timeout_s: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
        self.bundle, self.threads, self.warm = bundle, threads, max_batch_size

    def setup(self, device) -> None:
        from contract.bundle import load_bundle
        from service.engine import OrtEngine

        self.engine = OrtEngine(
            load_bundle(self.bundle), threads=self.threads, warmup_batch_sizes=(1, self.warm)
        )
        self.engine.start()
        self.spec = self.engine.manifest.input
        self.labels = {t: s.labels for t, s in self.engine.manifest.tasks.items()}

    def decode_request(self, request):
        from service.inputs import b64decode
        from service.preprocess import load_image

        task = request["task"]
        if task not in self.labels:
            raise ValueError(f"unknown task {task!r}")
        return task, load_image(b64decode(request["image"]), self.spec, 40_000_000)

    def batch(self, inputs):
        return inputs

    def predict(self, batch):
        from service.postprocess import softmax_rows

        tasks = [t for t, _ in batch]
        logits, _ = self.engine.infer(np.stack([x for _, x in batch]), tasks)
        return list(zip(tasks, softmax_rows(logits), strict=True))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        from service.postprocess import top_k

        task, probs = output
        return {"task": task, "predictions": [{"top_k": top_k(probs, self.labels[task], 1)}]}


def main() -> None:
    if ls is None:
        raise SystemExit("litserve is not installed: pip install -e '.[bench]'")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    args = p.parse_args()
    api = OnnxChainAPI(args.bundle, args.threads, args.max_batch_size, args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
