"""``mtserve serve --workers N`` (N >= 1): a supervisor, one engine process, N API processes.

::

    supervisor (binds the port; starts, watches and stops the others)
      |-- engine process: batcher + onnxruntime sessions + reload  (listens on RUN/engine.sock)
      |-- API process 0: uvicorn on its socket of the port -> connects --'
      |-- ...
      '-- API process N-1

The supervisor binds one listening socket per API process, all on the port with ``SO_REUSEPORT``, and
hands each process its own (``pass_fds``; each runs ``uvicorn.Server.run(sockets=[sock])``): the kernel
spreads the connections over them by a hash of their addresses. One socket shared by all would go to
whichever process wakes first, which accepts all that are queued: keep-alive connections opened
together (a load balancer's pool, a benchmark's) then land on one process while the others idle
(measured with two processes and 128 connections: 0 / 128, 2 / 126, 26 / 102 in 5 of 9 runs; with a
socket each 61 / 67, 63 / 65, 65 / 63). It starts the engine
first and the API processes once the engine has verified the bundle. Children are started with
``subprocess`` (spawn: nothing forked after threads), in their own session (a terminal's Ctrl-C reaches
the supervisor only, which stops them in order), and watch the supervisor's pid.

- SIGTERM / SIGINT: every API process drains (503 to new requests, admitted ones answered) and
  exits; then the engine finishes what it holds and exits; the supervisor exits 0.
- The engine process dies: the API processes answer 503 at once to everything pending and new, and
  ``/readyz`` 503, for ``ENGINE_DEATH_GRACE_S``; then they are stopped and the supervisor exits 1,
  so that the orchestrator restarts the pod (docs/server.md). An API process that dies is the same.

A run directory (on ``/dev/shm``) holds the engine's socket, the status block and the
``PROMETHEUS_MULTIPROC_DIR`` of every process; it is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service import row_arena
from service.engine_status import SUPERVISOR_PID_ENV, StatusBlock
from service.settings import Settings

log = logging.getLogger("mtserve.supervisor")
ENGINE_DEATH_GRACE_S = 1.0  # API processes answer 503 this long after the engine died, then exit
POLL_S = 0.05
SETTINGS_ENV = "MTSERVE_CHILD_SETTINGS"
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def bind(settings: Settings, n: int = 1) -> list[socket.socket]:
    """One listening socket per API process, all on the port (``SO_REUSEPORT``: the kernel spreads
    the connections over them); one socket for all where the system has no ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    if n > 1 and not reuse_port_works(family):
        log.warning("SO_REUSEPORT is not available: the %d API processes share one socket", n)
        n = 1
    socks: list[socket.socket] = []
    port = settings.port
    if n > 1:  # the port must be free: SO_REUSEPORT alone would join another server's sockets on it
        port = _free_port(settings.host, port, family)
    try:
        for _ in range(max(1, n)):
            sock = socket.create_server((settings.host, port), family=family, backlog=2048, reuse_port=n > 1)
            port = sock.getsockname()[1]  # --port 0: the others on the port the first got
            sock.set_inheritable(True)
            socks.append(sock)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def make_arenas(settings: Settings, n: int) -> list[int]:
    """The API processes' shared memory for rows (service/row_arena.py): one memfd each, ``rows_shm_mb``
    MiB; none (the socket carries the rows) where it is 0 or the system refuses."""
    if settings.rows_shm_mb <= 0:
        return []
    fds: list[int] = []
    try:
        for _ in range(n):
            fds.append(row_arena.create(settings.rows_shm_mb * row_arena.MIB))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        log.warning("no shared memory for rows (%s): they travel on the socket", exc)
        return []
    return fds


def _free_port(host: str, port: int, family: socket.AddressFamily) -> int:
    """``port`` (a free one for 0) if nothing listens on it, as a plain bind decides; OSError if taken
    (by anything, another mtserve's ``SO_REUSEPORT`` group included)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server: TIME_WAIT is fine
        probe.bind((host, port))
        return probe.getsockname()[1]


def reuse_port_works(family: socket.AddressFamily) -> bool:
    """Whether sockets of ``family`` take ``SO_REUSEPORT`` here (some sandboxes and systems refuse it)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return True
    except OSError:
        return False


def child_env(settings: Settings, run: Path) -> dict[str, str]:
    """The children's environment: the settings (the admin token stays where it came from: the
    environment or its file), the metrics directory, no telemetry."""
    metrics = run / "metrics"
    metrics.mkdir()
    env = dict(os.environ)
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    env[SETTINGS_ENV] = settings.model_dump_json(exclude={"admin_token"})
    env[SUPERVISOR_PID_ENV] = str(os.getpid())  # children watch it (a child re-parented early sees it)
    return env


def interpreter() -> list[str]:
    """This Python as the children run it: started with ``-P`` (the modules of ``PYTHONPATH``, not of
    the working directory, as the benchmarks start another source tree), the children keep it, so
    every process of one server runs the same code."""
    return [sys.executable, *(["-P"] if sys.flags.safe_path else [])]


class Supervisor:
    def __init__(self, settings: Settings, run: Path, log_level: str, access_log: bool):
        self.settings = settings
        self.run_dir = run
        self.n = settings.worker_count()
        self.block = StatusBlock(run / "status", create=True, n_api=self.n)
        self.env = child_env(settings, run)
        self.common = ["--run-dir", str(run), "--log-level", log_level] + (
            ["--access-log"] if access_log else []
        )
        self.arenas = make_arenas(settings, self.n)  # one per API process, or none
        self.stop_signal: int | None = None
        self.engine: subprocess.Popen | None = None
        self.apis: list[subprocess.Popen] = []
        self.drain_s = settings.timeout_ms / 1000.0 + 30.0

    def _spawn(self, role: str, *args: str, fds: tuple[int, ...] = ()) -> subprocess.Popen:
        cmd = [*interpreter(), "-m", "service.supervisor", role, *args, *self.common]
        return subprocess.Popen(cmd, env=self.env, pass_fds=fds, start_new_session=True)

    def close_arenas(self) -> None:
        for fd in self.arenas:
            os.close(fd)
        self.arenas = []

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _engine_verified(self) -> int | None:
        """Wait until the engine has verified the bundle and listens (None), or its exit code."""
        assert self.engine is not None
        while not self.block.info():
            if (code := self.engine.poll()) is not None:
                return code if code > 0 else 1
            if self.stop_signal is not None:
                return self._stop([self.engine])
            time.sleep(POLL_S)
        return None

    def run(self, socks: list[socket.socket]) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        arenas = ["--arenas", ",".join(map(str, self.arenas))] if self.arenas else []
        self.engine = self._spawn("engine", *arenas, fds=tuple(self.arenas))
        if (code := self._engine_verified()) is not None:
            log.error("the engine process exited with %d before serving", code)
            return code
        for i in range(self.n):
            fd = socks[i % len(socks)].fileno()  # one socket for all where SO_REUSEPORT is missing
            arena = ("--arena", str(self.arenas[i])) if self.arenas else ()
            fds = (fd, self.arenas[i]) if self.arenas else (fd,)
            self.apis.append(self._spawn("api", "--index", str(i), "--fd", str(fd), *arena, fds=fds))
            self.block.set_api_pid(i, self.apis[-1].pid)
        for sock in socks:
            sock.close()  # the API processes hold them: once all have closed theirs, connections are refused
        self.close_arenas()  # the children hold them now
        log.info("serving on %s:%d: engine pid %d, %d API process(es)", self.settings.host,
                 self.settings.port, self.engine.pid, self.n)  # fmt: skip
        return self._watch()

    def _watch(self) -> int:
        assert self.engine is not None
        while True:
            if self.stop_signal is not None:
                log.info("signal %d: draining every process", self.stop_signal)
                return self._stop([*self.apis, self.engine])
            if (code := self.engine.poll()) is not None:
                log.error("the engine process exited (%d); stopping the API processes, exiting 1", code)
                time.sleep(ENGINE_DEATH_GRACE_S)  # they answer 503 meanwhile (and /readyz 503)
                self._stop(self.apis)
                return 1
            for i, api in enumerate(self.apis):
                if (code := api.poll()) is not None:
                    log.error("API process %d exited (%d); stopping the others, exiting 1", i, code)
                    self._stop([a for a in self.apis if a is not api] + [self.engine])
                    return 1
            time.sleep(POLL_S)

    def _stop(self, procs: list[subprocess.Popen]) -> int:
        """SIGTERM the API processes (in parallel), wait for them, then the engine: 0 if all exit 0."""
        apis = [p for p in procs if p is not self.engine]
        code = 0
        for group in (apis, [p for p in procs if p is self.engine]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    rc = p.wait(timeout=self.drain_s)
                except subprocess.TimeoutExpired:
                    log.error("process %d did not stop within %.0f s: killed", p.pid, self.drain_s)
                    p.kill()
                    rc = p.wait()
                if rc != 0:  # the exit code says which: name the process
                    name = "the engine" if p is self.engine else f"API {self.apis.index(p)}"
                    log.error("%s process (%d) exited %d while draining", name, p.pid, rc)
                code = code or (rc != 0)
        return int(code)


def run_supervisor(settings: Settings, log_level: str = "info", access_log: bool = False) -> int:
    logging.basicConfig(level=log_level.upper(), format=FORMAT)
    try:  # shared memory where there is some (a read-only or missing /dev/shm: the temp directory)
        run = Path(tempfile.mkdtemp(prefix="mtserve-", dir="/dev/shm"))
    except OSError:
        run = Path(tempfile.mkdtemp(prefix="mtserve-"))
    try:
        supervisor = Supervisor(settings, run, log_level, access_log)
        try:
            socks = bind(settings, supervisor.n)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
            return 1
        return supervisor.run(socks)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -- the children --------------------------------------------------------------------------------
def _child_settings() -> Settings:
    return Settings(**json.loads(os.environ.pop(SETTINGS_ENV)))


def engine_main(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np
    import onnxruntime  # ORT_DISABLE_TELEMETRY is set (child_env): no telemetry client starts

    from contract.errors import BundleError
    from service.engine_core import EngineCore
    from service.engine_thread import favour_engine_thread

    onnxruntime.disable_telemetry_events()

    block = StatusBlock(Path(args.run_dir) / "status")
    settings = _child_settings()
    favour_engine_thread(settings.gil_switch_ms)
    arenas = [np.frombuffer(row_arena.map_fd(int(fd), writable=False), "<f4") for fd in args.arenas]
    try:
        core = EngineCore(settings, block, f"{args.run_dir}/engine.sock", arenas)
    except BundleError as exc:
        log.error("refused bundle: %s", exc)
        return 2
    try:
        import uvloop

        code = uvloop.run(core.run())
    except ImportError:
        code = asyncio.run(core.run())
    if core.orphaned:  # nobody else will
        shutil.rmtree(args.run_dir, ignore_errors=True)
    return code


def api_main(args: argparse.Namespace) -> int:
    from service.api_process import serve_api
    from service.row_arena import RowArena

    block = StatusBlock(Path(args.run_dir) / "status")
    sock = socket.socket(fileno=args.fd)
    endpoint = f"{args.run_dir}/engine.sock"
    arena = RowArena(row_arena.map_fd(args.arena, writable=True)) if args.arena >= 0 else None
    return serve_api(
        _child_settings(), block, endpoint, args.index, sock, args.log_level, args.access_log, arena
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.supervisor", description="a child of mtserve serve"
    )
    parser.add_argument("role", choices=["engine", "api"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--fd", type=int, default=-1)
    parser.add_argument("--arena", type=int, default=-1, help="api: its rows' shared memory (fd)")
    parser.add_argument("--arenas", type=lambda v: v.split(","), default=[], help="engine: every API's")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=FORMAT)
    return engine_main(args) if args.role == "engine" else api_main(args)


if __name__ == "__main__":
    sys.exit(main())
