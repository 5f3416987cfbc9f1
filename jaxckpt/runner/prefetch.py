"""Training batches prepared ahead on a background thread, each with the iterator position after it.

The data pipeline (Python, on the host) and the transfer to the devices then overlap the previous
step's computation instead of adding to it. Because batches are read ahead, the position to save
with a checkpoint is not the iterator's current one: each batch carries the position right after
it, and the loop saves the position of the last batch it trained on, so resume stays exact.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_DONE = object()


class Prefetcher:
    """Iterates `(batch, position)` pairs, computed up to `depth` batches ahead on a daemon thread.

    Args:
      iterator: a checkpointable iterator (`__next__`, `get_state`).
      place: called on each host batch in the background thread (e.g. put it on the devices).
      depth: how many batches to prepare ahead; 0 prepares each one on the caller's thread.

    Exceptions raised by the iterator or `place` are raised by `__next__` in the caller's thread,
    with their tracebacks.
    """

    def __init__(self, iterator: Any, place: Callable[[Any], Any], depth: int = 2):
        self._iterator = iterator
        self._place = place
        self._depth = depth
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="jaxckpt-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> tuple[Any, Any]:
        batch = next(self._iterator)
        return self._place(batch), self._iterator.get_state()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._produce()
            except BaseException as e:  # handed to the consumer, raised there
                item = (_DONE, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is _DONE:
                return

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._queue is None:
            return self._produce()
        batch, position = self._queue.get()
        if batch is _DONE:
            raise position
        return batch, position

    def close(self) -> None:
        """Stops the background thread (batches prepared but not taken are dropped)."""
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=5)
