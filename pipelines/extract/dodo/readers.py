"""Read a resource's windows in a thread of their own, a few windows ahead of dlt."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


class Reader:
    """Runs an iterator in its own thread, at most `depth` items ahead of the consumer.

    The HTTP wait and the JSON/Arrow conversion of the next windows overlap with dlt writing the
    previous ones, and the resources of one load read concurrently (each has its own thread;
    dlt's round-robin pulls from all of them). Items still arrive strictly in order, so the
    caller commits its cursor exactly as before. The thread starts at once; `close()` (or the
    end of iteration) stops it.
    """

    def __init__(self, name: str, produce: Iterator[Any], depth: int) -> None:
        self._slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._produce:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._slots.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the request in flight)."""
        self._stop.set()
        self._thread.join(timeout=5)
