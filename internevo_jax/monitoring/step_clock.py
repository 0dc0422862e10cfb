"""Each train step's own wall time, without making the host wait for the device.

The loop dispatches step ``i + 1`` before it reads step ``i``'s metrics (so the device never idles while the host
logs), which means the host learns that a step finished only some time after it did: after it has fetched the next
batch and dispatched the next step. Timing at that point charges a slow batch fetch or a slow dispatch to the step
before the one it delays. A watcher thread here waits on each step's outputs instead and notes when they became
ready; a step's time is from the previous step's completion (or the loop's start, or the end of a pause such as a
validation run) to its own. That is the wall time the step added to the run: its device time when the device is the
bottleneck, and the host's delay when the device was left waiting for it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import jax


class StepClock:
    """``submit(key, outputs)`` right after dispatching a step; ``seconds(key)`` once its outputs are read."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._ready: dict[Any, float] = {}
        self._starts: dict[Any, float] = {}
        self._cond = threading.Condition()
        self._origin = time.perf_counter()  # where the next submitted step's time starts at the earliest
        self._last_end: float | None = None
        self._thread = threading.Thread(target=self._watch, name="internevo-step-clock", daemon=True)
        self._thread.start()

    def submit(self, key: Any, outputs: Any) -> None:
        """Starts watching ``outputs`` (a pytree of jax arrays) of the step ``key`` that was just dispatched."""
        self._starts[key] = self._origin
        self._queue.put((key, outputs))

    def pause_ended(self) -> None:
        """Time the host spent on something else (validation) is nobody's step: the next step starts now."""
        self._origin = time.perf_counter()

    def seconds(self, key: Any) -> float:
        """Step ``key``'s wall time; waits for the watcher to have seen it finish. Call in dispatch order."""
        with self._cond:
            while key not in self._ready:
                self._cond.wait()
            end = self._ready.pop(key)
        start = self._starts.pop(key)
        if self._last_end is not None:
            start = max(start, self._last_end)
        self._last_end = end
        return max(end - start, 1e-9)

    def close(self) -> None:
        self._queue.put(None)

    def _watch(self) -> None:
        while (item := self._queue.get()) is not None:
            key, outputs = item
            try:
                jax.block_until_ready(outputs)
            except Exception:  # noqa: BLE001 - the main thread's read of the same outputs raises it
                pass
            now = time.perf_counter()
            with self._cond:
                self._ready[key] = now
                self._cond.notify_all()
