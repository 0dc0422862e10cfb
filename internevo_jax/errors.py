"""Every error class of the package and the exit-code table the command line maps them to.

A restart policy tells failures apart by the exit code, so each class that can end a run has one row in
``EXIT_CODES`` (the README's exit-code table lists the same numbers). Each error's message names the thing, the place
and the fix; the class only says which kind of failure it is. ``ConfigError`` is defined by the config (which imports
nothing else from the package) and re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from internevo_jax.config import ConfigError

__all__ = [
    "EXIT_CODES",
    "EXIT_HANG",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "CheckpointError",
    "CheckpointMismatch",
    "ConfigError",
    "ConvertError",
    "DataError",
    "FolderInUse",
    "LockError",
    "PromptError",
    "RunFolderError",
    "TokenizerError",
    "TrainingDiverged",
    "exit_code_of",
    "run_folder_write",
]


class TokenizerError(ConfigError):
    """A tokenizer that cannot be exported faithfully; the message names the file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be locked, saved, read or restored; the message says which step, folder and why."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint's arrays do not fit the config (shapes, missing arrays): no older step would fit either."""


class LockError(RuntimeError):
    """The checkpoint folder's lock could not be taken (the message names the folder, the reason and the fix)."""


class FolderInUse(LockError):
    """Another live run holds the folder's lock (the message names it, when it goes stale, and the fix)."""


class DataError(ValueError):
    """A dataset file is malformed or does not fit the config; the message names the file (and line, offset)."""


class RunFolderError(RuntimeError):
    """The run folder cannot be written (disk full, read-only, permissions): the message names the file and the fix.

    Not an ``OSError``: handlers of OS errors elsewhere (the checkpoint's) must not take it for one of theirs."""


class TrainingDiverged(RuntimeError):
    """Gradients were non-finite step after step; the message names the steps and what to change."""


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, too long for ``max_length``, ids outside the vocabulary)."""


class ConvertError(RuntimeError):
    """A conversion that cannot go on; the message names the path and the fix."""


EXIT_HANG = 4  # the watchdog fired: every thread's stack went to stderr, the process exits at once (restartable)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): saved at an agreed step, or stopped at once by a second Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM) with checkpointing off: stopped cleanly, nothing saved

# (class, exit code, label): the first row whose class matches wins, so subclasses come before their bases.
EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ConfigError, 2, "config error"),
    (ConvertError, 2, "config error"),
    (CheckpointError, 3, "checkpoint error"),
    (LockError, 3, "checkpoint error"),
    (DataError, 5, "data error"),
    (TrainingDiverged, 6, "training diverged"),
    (RunFolderError, 7, "run folder error"),
)


@contextlib.contextmanager
def run_folder_write(path: Path, setting: str = "run_folder") -> Iterator[None]:
    """Turns an ``OSError`` while writing ``path`` (metrics.jsonl, TensorBoard, config.json) into a ``RunFolderError``
    naming the file, the OS error and the fix; ``setting``: the config key that moves the file elsewhere."""
    try:
        yield
    except OSError as e:
        raise RunFolderError(
            f"{path}: cannot be written ({e.strerror or e}): the disk is full or the folder is read-only. Free space "
            f"or make it writable and restart (the run resumes from its last checkpoint), or set --config.{setting} "
            "to a writable folder"
        ) from e


def exit_code_of(error: BaseException) -> tuple[int, str] | None:
    """The exit code and label ``EXIT_CODES`` gives ``error``, or None for an error no row covers (a bug: exit 1)."""
    for cls, code, label in EXIT_CODES:
        if isinstance(error, cls):
            return code, label
    return None
