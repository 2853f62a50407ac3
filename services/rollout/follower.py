"""Follower: the AdapterManager's watcher. A thread consumes the (reconnecting) broker watch
stream for the names the manager follows and hands each announced version to `deliver`
(the manager's `on_published`) on the server's event loop, in order, one at a time. With
`staged`, uploads that begin on the broker go to it as well (the manager's `on_staged`,
which starts loading their bytes): handed over without waiting, so a version's PUBLISHED
event is never held up behind its own staged load."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from services.broker.client import BrokerClient, WatchStream
from services.common.records import AdapterVersion

log = logging.getLogger(__name__)
REOPEN_DELAY_S = 0.25
Deliver = Callable[[AdapterVersion], Coroutine[Any, Any, None]]
Staged = Callable[[AdapterVersion], None]


class Follower:
    def __init__(self, client: BrokerClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop
        self.after: dict[str, int] = {}
        self._deliver: Deliver | None = None
        self._staged: Staged | None = None
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-follower", daemon=True)

    def start(self, deliver: Deliver, staged: Staged | None = None) -> None:
        self._deliver, self._staged = deliver, staged
        self._thread.start()

    def watch(self, name: str, after: int) -> None:
        """Announce the versions of `name` after `after` (no-op if already watched)."""
        with self._lock:
            if name in self.after:
                return
            self.after[name] = after
            self._changed.set()
            if self._stream is not None:
                self._stream.close()  # reopened with the new set of names

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        if self._thread.is_alive():
            self._thread.join(10)

    def _on_staged(self, record: AdapterVersion) -> None:
        assert self._staged is not None
        self.loop.call_soon_threadsafe(self._staged, record)

    def _run(self) -> None:
        assert self._deliver is not None
        reopened = False
        while not self._stop.is_set():
            if reopened:
                # Names asked for in a burst (a user walking through 1,000 adapters) are
                # gathered into one reopen instead of one each: every reopen re-reads each
                # name's latest on the broker and starts a blocking read there (one of its
                # redis-py pool's 100 connections). Reopening per name, the serving bench's
                # 1,000 Zipf adapters left the broker answering "Too many connections".
                # Versions published meanwhile are not missed: the stream resumes from `after`.
                self._stop.wait(REOPEN_DELAY_S)
            with self._lock:
                names = dict(self.after)
                self._changed.clear()
                self._stream = self.client.watch(names, on_staged=self._on_staged if self._staged else None) \
                    if names else None
            reopened = self._stream is not None
            if self._stream is None:
                self._changed.wait()
                continue
            try:
                for rec, _live in self._stream:
                    asyncio.run_coroutine_threadsafe(self._deliver(rec), self.loop).result()
                    with self._lock:
                        self.after[rec.name] = max(self.after.get(rec.name, 0), rec.version)
            except Exception as e:  # a watch that fails for good: log, back off, reopen
                log.error("watch failed: %s; retrying in 1s", e)
                self._stop.wait(1.0)
