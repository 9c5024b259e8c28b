"""``mtserve serve BUNDLE``: one engine process per device (the batcher) behind ``--workers`` API processes
(service/supervisor.py), or, with ``--workers 0``, one uvicorn process doing everything.

Every option is also an ``MTSERVE_*`` environment variable (flags win). SIGTERM/SIGINT: stop
admitting (503), finish every admitted request, exit 0. The admin token is never a flag (it would
show in ``ps``): ``MTSERVE_ADMIN_TOKEN`` or a file (``--admin-token-file``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

from service.settings import Settings

# flag -> (settings field, type, help)
OPTIONS: dict[str, tuple[str, type, str]] = {
    "--host": ("host", str, "interface to bind (default 0.0.0.0)"),
    "--port": ("port", int, "TCP port (default 8000)"),
    "--device": ("device", str, "cpu or cuda (default cpu)"),
    "--device-id": ("device_id", int, "CUDA device ordinal (default 0)"),
    "--threads": ("threads", int, "onnxruntime intra-op threads (default: the CPUs available)"),
    "--max-batch-size": ("max_batch_size", int, "rows per batch (default 32)"),
    "--max-wait-ms": ("max_wait_ms", float, "how long a batch waits to fill (default 2)"),
    "--queue-size": ("queue_size", int, "rows waiting before 429 (default 1024)"),
    "--max-inflight": ("max_inflight", int, "requests in flight before 429 (default queue size + 2 batches)"),
    "--timeout-ms": ("timeout_ms", float, "request deadline; past it 504 (default 10000)"),
    "--max-body-mb": ("max_body_mb", float, "request body limit in MiB (default 16)"),
    "--max-images-per-request": ("max_images_per_request", int, "images per request (default 64)"),
    "--max-pixels": ("max_pixels", int, "decoded pixels per image (default 40M)"),
    "--batching": ("batching", str, "cross-task (default) or per-task (the per-model baseline)"),
    "--batch-buckets": ("batch_buckets", str, "auto (CUDA: powers of 2; CPU: off), pow2, off, 1,2,4,8"),
    "--cuda-graphs": ("cuda_graphs", str, "on (default) or off: a CUDA graph per (variant, bucket)"),
    "--workers": ("workers", str, "API processes before one engine process; 0 = one process (default auto)"),
    "--gil-switch-ms": ("gil_switch_ms", float, "GIL switch interval of the engine's process (default 0.5)"),
    "--rows-shm-mb": ("rows_shm_mb", int, "MiB of shared memory per API process for rows (default 32)"),
    "--emulate-device-ms": ("emulate_device_ms", float, "benchmarks: the engine sleeps per batch instead"),
    "--preprocess-workers": ("preprocess_workers", int, "decode threads (default: the CPUs available)"),
    "--model-dir": ("model_dir", str, "bundles POST /admin/reload may load (default: BUNDLE's parent)"),
    "--admin-token-file": ("admin_token_file", str, "file with the admin token (else no /admin)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (or MTSERVE_BUNDLE)")
    for flag, (field, typ, text) in OPTIONS.items():
        env = "MTSERVE_" + field.upper()
        choices = {
            "--device": ["cpu", "cuda"],
            "--batching": ["cross-task", "per-task"],
            "--cuda-graphs": ["on", "off"],
        }.get(flag)
        parser.add_argument(flag, dest=field, type=typ, choices=choices, help=f"{text}; env {env}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line, then MTSERVE_* variables, then defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def disable_onnxruntime_telemetry() -> None:
    """A server must not phone home. ORT_DISABLE_TELEMETRY is read when onnxruntime is imported (the
    telemetry client starts then): set it first, unless the operator set it; then turn events off."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    onnxruntime.disable_telemetry_events()


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.worker_count() > 0:  # API processes + one engine process (service/supervisor.py)
        from service.supervisor import run_supervisor

        return run_supervisor(settings, args.log_level, args.access_log)
    disable_onnxruntime_telemetry()  # before service.app imports onnxruntime
    import uvicorn

    from service.app import create_app
    from service.engine_thread import favour_engine_thread
    from service.http_protocol import OneWriteProtocol

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)  # verifies the bundle: BundleError -> exit 2
    favour_engine_thread(settings.gil_switch_ms)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.draining = True  # new requests: 503; admitted ones finish before the lifespan ends
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # a drained shutdown is a clean exit (0), not death by the signal uvicorn re-raises
                self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=None,
        workers=1,
        http=OneWriteProtocol,
    )
    server = Server(config)
    server.run()
    if fatal:
        logging.getLogger("mtserve").error("exiting: %s", fatal[0])
        return 1
    return 0
