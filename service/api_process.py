"""One API process of ``--workers N``: the app (same routes, same outer layer) around a
:class:`~service.front_service.FrontService`, served by uvicorn on the socket the supervisor bound."""

from __future__ import annotations

import contextlib
import logging
import socket

import uvicorn

from service.app import create_app
from service.engine_status import StatusBlock
from service.front_service import FrontService
from service.http_protocol import OneWriteProtocol
from service.row_arena import RowArena
from service.settings import Settings

log = logging.getLogger("mtserve.api")


def serve_api(
    settings: Settings,
    block: StatusBlock,
    endpoint: str,
    index: int,
    sock: socket.socket,
    log_level: str = "info",
    access_log: bool = False,
    arena: RowArena | None = None,
) -> int:
    """Serve until SIGTERM (drain: 503 to new requests, every admitted one answered) or until the engine
    or the supervisor dies (exit 1, once what is pending has been answered 503)."""
    front = FrontService(settings, block, endpoint, index, arena)
    app = create_app(settings, service=front)  # type: ignore[arg-type]
    fatal: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            front.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # a drained shutdown exits 0

    config = uvicorn.Config(
        app,
        http=OneWriteProtocol,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=None,
        lifespan="on",
    )
    server = Server(config)

    def on_fatal(message: str) -> None:
        fatal.append(message)  # the supervisor stops this process after a grace period

    front.on_fatal = on_fatal
    front.on_orphaned = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    if fatal:
        log.error("API process %d exiting: %s", index, fatal[0])
        return 1
    return 0
