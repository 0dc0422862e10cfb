"""How a run stops early on a signal: SIGTERM (preemption: ``kill``, ``scancel``, ``docker stop``) and SIGINT (Ctrl-C).

SIGTERM is JAX's preemption notice: its C++ handler (installed by ``jax.distributed.initialize``) tells every process
and they agree on a step, read here every step with ``reached_preemption_sync_point``. No Python SIGTERM handler is
installed, since one would disable that mechanism (``shared/reference/reliability.md`` E7). With checkpointing on,
the trainer saves at that step and exits 0 (a restart resumes there); with it off, it stops there with nothing saved
and exit code 143 (as a killed process, so a restart policy does not take the run for finished).

SIGINT gets a Python handler while ``fit()`` runs: the first Ctrl-C is turned into the same preemption notice (the
handler sends SIGTERM to its own process), so the run saves at an agreed step, logs ``interrupted at step k; saved``
and exits 130; a second Ctrl-C raises ``KeyboardInterrupt`` at once (exit 130 too, nothing new saved, an in-flight
save abandoned; the newest complete checkpoint stays). A single process needs no agreement: there the handler only
sets a flag that the loop reads after the step in flight (also without a JAX cluster, as in a notebook).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol

import jax
from jax.experimental import multihost_utils

from internevo_jax.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from internevo_jax.monitoring.logger import get_logger


def preemption_reached(step: int) -> bool:
    """True at the step every process agreed to stop at after a SIGTERM reached any of them (a JAX cluster only)."""
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service is off: no preemption notices
        return False


class Interrupts:
    """Installs the SIGINT handler for the ``with`` block (main thread only) and says when to stop.

    ``stop_reason(done)`` is called once per step by every process, after ``done`` batches: "interrupted" (Ctrl-C),
    "preempted" (SIGTERM) or None.
    """

    def __init__(self, saves: bool) -> None:
        self.saves = saves  # whether a stop is saved (for the Ctrl-C message)
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt("second Ctrl-C: stopping at once")
        get_logger().warning(
            "Ctrl-C: stopping at the next step every process agrees on%s; Ctrl-C again to stop at once",
            ", with a checkpoint" if self.saves else " (nothing is saved: ckpt.enable_save_ckpt=False)",
        )
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice: all processes agree on the step

    def stop_reason(self, done: int) -> str | None:
        if preemption_reached(done):
            return "interrupted" if self.count else "preempted"
        if self.count and jax.process_count() == 1:
            return "interrupted"  # one process needs no agreement: the step after the Ctrl-C
        return None


def exit_code(summary: dict[str, Any]) -> int:
    """``launch.py``'s exit code for a ``fit()`` summary that returned: 0, ``EXIT_INTERRUPTED`` or
    ``EXIT_TERMINATED``."""
    stopped = summary.get("stopped")
    if stopped == "interrupted":
        return EXIT_INTERRUPTED
    if stopped == "preempted" and not summary.get("saved"):
        return EXIT_TERMINATED
    return 0


def new_summary(start: int, finished: bool = False) -> dict[str, Any]:
    """``fit()``'s summary before any step: ``stopped`` stays None unless a signal or the stop file ends the run
    early ("preempted", "interrupted", "stop_file"; ``saved`` says whether that step was checkpointed), so a
    stopped run never reads as a finished one (``finished``: ``data.total_steps`` reached)."""
    return dict(
        steps=0,
        tokens=0,
        start_step=start,
        end_step=start,
        wall_seconds=0.0,
        valid_seconds=0.0,
        stopped=None,
        saved=False,
        preempted=False,
        finished=finished,
        tgs_mean=0.0,
        mfu=None,
    )


def summary_line(summary: dict[str, Any], total_steps: int, device_kind: str) -> str:
    """The run's last line: ``done: ...`` when it reached ``total_steps``, else ``stopped early (why) at batch k of
    n: ...``, then steps, tokens, time, mean tgs and MFU."""
    end = summary["end_step"]
    head = (
        "done"
        if summary["stopped"] is None
        else f"stopped early ({summary['stopped']}) at batch {end} of {total_steps}"
    )
    mfu, wall, valid = summary["mfu"], summary["wall_seconds"], summary["valid_seconds"]
    return (
        f"{head}: {summary['steps']} steps (batches {summary['start_step']}..{end - 1}), {summary['tokens']} tokens, "
        f"{wall:.1f}s (validation {valid:.1f}s), mean tgs {summary['tgs_mean']:.1f}, "
        f"MFU {f'{mfu:.1%}' if mfu is not None else f'n/a (no peak FLOP/s known for {device_kind!r})'}"
    )


def stop_message(stopped: str, done: int, saved: bool) -> str:
    """The one line saying where a signal stopped the run (logged once its checkpoint is complete)."""
    unsaved = "nothing saved (ckpt.enable_save_ckpt=False)"
    if stopped == "preempted":
        if saved:
            return f"preemption: saved step {done}; exiting cleanly"
        return f"preemption (SIGTERM): stopped at step {done}, {unsaved}; exit code {EXIT_TERMINATED}"
    return f"interrupted at step {done}; {'saved' if saved else unsaved}"


class _PendingSave(Protocol):
    def wait_pending(self, timeout: float | None) -> bool: ...

    def close(self) -> None: ...


def settle_pending_save(checkpointer: _PendingSave, error: BaseException, timeout: float | None, at: int) -> None:
    """On the way out of ``fit()`` with ``error``: finishes the checkpoint in flight within ``timeout`` seconds
    (at once on a second Ctrl-C, or when Ctrl-C is pressed while waiting) or abandons it, and says which, instead
    of leaving orbax's threads to die with the interpreter. ``at``: batches done, for the message."""
    log = get_logger()
    forced = isinstance(error, KeyboardInterrupt)
    if forced:
        log.error("interrupted at step %d: stopped at once (second Ctrl-C), nothing more saved", at)
    try:
        finished = checkpointer.wait_pending(0.0 if forced else timeout)
    except KeyboardInterrupt:
        forced, finished = True, False
    if not finished:
        log.error(
            "abandoned the checkpoint being written (%s): the next start removes its tmp folder and resumes from "
            "the newest complete checkpoint",
            "Ctrl-C" if forced else f"still writing after {timeout:g} s",
        )
        return
    try:
        checkpointer.close()  # the pending save is complete (or failed: this says how); frees the folder's lock
    except Exception as close_error:  # noqa: BLE001 - the error already propagating stays the one reported
        log.error("%s", close_error)
