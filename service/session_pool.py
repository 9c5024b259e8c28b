"""Session reuse across bundle versions: one onnxruntime session per (file sha256, session options).

A reload builds a new engine while the old one still serves. Without reuse, the new engine loads a
second copy of every file, so reloading a version that adds one task to a 100-task bundle costs a
second copy of the model (memory and start-up). With a :class:`SessionPool`, an engine asks for the
session of a file by its sha256 (from the verified manifest) and its session options: a file that
did not change between the versions is the same session, already loaded and warmed up; only new
files are loaded. Sessions are reference-counted per owner (an engine): the last owner to release a
key closes it (drops the pool's reference; onnxruntime frees it once no engine holds it).

onnxruntime's ``InferenceSession.run`` may be called from several threads at once, which is what
happens while the old version drains and the new one serves. Sessions that must not be shared are
simply not pooled (the engine asks the pool only for plain ones: no CUDA graph, whose captured
buffers belong to one engine).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SessionKey:
    """What makes two sessions interchangeable: the file's bytes and how the session was built."""

    sha256: str
    options: tuple  # hashable description of the session options and providers


@dataclass
class _Entry:
    session: object
    owners: dict[int, int] = field(default_factory=dict)  # id(owner) -> references

    @property
    def refs(self) -> int:
        return sum(self.owners.values())


class SessionPool:
    """Sessions shared by every engine of the process, keyed by :class:`SessionKey`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self.created = 0
        self.reused = 0

    def acquire(self, key: Hashable, create: Callable[[], object], owner: object) -> tuple[object, bool]:
        """The session for ``key`` (``create()`` builds it when absent); returns (session, reused).

        Creation runs under the pool's lock: two engines never load the same file twice (reloads
        run one at a time, so this serialises nothing that would otherwise run in parallel)."""
        with self._lock:
            entry = self._entries.get(key)
            reused = entry is not None
            if entry is None:
                entry = _Entry(create())  # an exception leaves the pool unchanged
                self._entries[key] = entry
                self.created += 1
            else:
                self.reused += 1
            entry.owners[id(owner)] = entry.owners.get(id(owner), 0) + 1
            return entry.session, reused

    def release(self, key: Hashable, owner: object) -> bool:
        """Drop one reference of ``owner``; returns True when the session left the pool."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or id(owner) not in entry.owners:
                return False
            entry.owners[id(owner)] -= 1
            if entry.owners[id(owner)] <= 0:
                del entry.owners[id(owner)]
            if entry.refs == 0:
                del self._entries[key]
                return True
            return False

    def release_all(self, owner: object) -> int:
        """Drop every reference of ``owner`` (an engine that stops); returns the sessions closed."""
        with self._lock:
            closed = 0
            for key in [k for k, e in self._entries.items() if id(owner) in e.owners]:
                entry = self._entries[key]
                del entry.owners[id(owner)]
                if entry.refs == 0:
                    del self._entries[key]
                    closed += 1
            return closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sessions": len(self._entries), "created": self.created, "reused": self.reused}


_default = SessionPool()


def default_pool() -> SessionPool | None:
    """The process's pool: every engine the server builds (the first one and each reload) uses it.
    ``MTSERVE_SESSION_REUSE=0`` turns reuse off (every version loads all of its files; the A/B of
    results/add-task)."""
    if os.environ.get("MTSERVE_SESSION_REUSE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return _default
