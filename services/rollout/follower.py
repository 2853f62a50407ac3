"""Follows adapter names on the broker: a thread consumes the (reconnecting) watch stream
and hands each announced version to the AdapterManager on the server's event loop, in
order, one at a time."""

from __future__ import annotations

import asyncio
import logging
import threading

from services.broker.client import BrokerClient, WatchStream
from services.rollout.adapters import AdapterManager

log = logging.getLogger(__name__)


class Follower:
    def __init__(self, client: BrokerClient, manager: AdapterManager, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.manager, self.loop = client, manager, loop
        self.after: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-follower", daemon=True)
        self._thread.start()

    def follow(self, name: str, after: int) -> None:
        """Start following `name` from the version after `after` (no-op if followed)."""
        with self._lock:
            if name in self.after:
                return
            self.after[name] = after
            self.manager.followed.add(name)
            self._changed.set()
            if self._stream is not None:
                self._stream.close()  # reopened with the new set of names

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                names = dict(self.after)
                self._changed.clear()
                self._stream = self.client.watch(names) if names else None
            if self._stream is None:
                self._changed.wait()
                continue
            try:
                for rec, _live in self._stream:
                    fut = asyncio.run_coroutine_threadsafe(self.manager.on_published(rec), self.loop)
                    fut.result()
                    with self._lock:
                        self.after[rec.name] = max(self.after.get(rec.name, 0), rec.version)
            except Exception as e:  # a watch that fails for good: log, back off, reopen
                log.error("watch failed: %s; retrying in 1s", e)
                self._stop.wait(1.0)
