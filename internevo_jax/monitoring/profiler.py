"""``--profiling``: a ``jax.profiler`` trace of a window of training steps (InternEvo's PR-01, JAX-native)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections


class Profiler:
    """``--profiling``: a ``jax.profiler`` trace of batches ``[profile_start_step, + profile_num_steps)``.

    The window skips the first steps (compilation and warm-up would dominate the trace), as InternEvo's schedule
    does; the trace folder opens in TensorBoard's profile plugin or Perfetto.
    """

    def __init__(self, folder: Path, monitor: ml_collections.ConfigDict, enabled: bool, log: Any):
        self.folder, self.log = folder / f"process{jax.process_index()}", log
        self.start_at = monitor.profile_start_step if enabled else None
        self.stop_at = monitor.profile_start_step + monitor.profile_num_steps
        self.active = False

    def before(self, batch_count: int, state: Any) -> None:
        if self.start_at is None:
            return
        if batch_count == self.start_at and not self.active:
            jax.block_until_ready(state)  # the trace starts on an idle device, so it holds whole steps
            jax.profiler.start_trace(str(self.folder))
            self.active = True
        elif batch_count == self.stop_at:
            self.stop(state)

    def abandon(self) -> None:
        """Ends a trace still running when the run fails, without waiting for the state (it may never be ready), so
        the process (a notebook, a test) can trace again."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.log.info("profiler trace in %s ended early by an error", self.folder)

    def stop(self, state: Any) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            self.log.info("profiler trace of batches %d..%d in %s", self.start_at, self.stop_at - 1, self.folder)
