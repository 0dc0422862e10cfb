"""How orbax is set up for our checkpoints: its manager's options and item handlers, and its logging of failed saves
kept off the console (our ``CheckpointError`` says once which step, folder and OS error)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from internevo_jax.checkpoint.step_folders import StepNames
from internevo_jax.monitoring.logger import get_logger


class _OrbaxTracebacks(logging.Filter):
    """Orbax logs one failed async save with a traceback from every thread it passes through (six for one full
    disk), before our ``CheckpointError`` says once which step, folder and OS error. Every orbax error reaches the
    caller as an exception here, so its logged tracebacks go to our log at DEBUG instead of the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            get_logger().debug(f"orbax: {record.getMessage()}", exc_info=record.exc_info)
            return False
        # Said at every save: the state is saved without OCDBT on purpose (an array per folder, see above).
        return not record.getMessage().startswith("[process=0][thread=async_save] Skipping merge of OCDBT")


_previous_unraisablehook = sys.unraisablehook  # the hook _unraisable passes everything else on to


def quiet_orbax_tracebacks() -> None:
    """Sends orbax's logged tracebacks of failed saves, and tensorstore's late ones, to our log at DEBUG (once)."""
    global _previous_unraisablehook
    absl = logging.getLogger("absl")  # orbax logs through absl's logger
    if not any(isinstance(f, _OrbaxTracebacks) for f in absl.filters):
        absl.addFilter(_OrbaxTracebacks())
    if getattr(sys.unraisablehook, "__name__", "") != _unraisable.__name__:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisable


def _unraisable(unraisable: Any) -> None:
    """After a failed save, tensorstore finishes its other writes into the asyncio loop orbax already closed; each
    prints a "RuntimeError: Event loop is closed" traceback, harmless and after the real error: to DEBUG."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        get_logger().debug("orbax: a write finished after its event loop was closed (a failed save)")
        return
    _previous_unraisablehook(unraisable)


def orbax_manager(directory: Path, max_to_keep: int | None, borrow: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager for one folder: async saves, our step listing, the state without OCDBT (an array per folder, so
    a checksum names the array) and the meta as JSON; ``borrow``: save host numpy arrays without copying them."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # a save killed mid-way leaves a tmp folder; drop it on the next start
        create=True,
        step_name_format=StepNames(),
    )
    state = ocp.StandardCheckpointHandler(use_ocdbt=False)
    if borrow:  # the same files; a PyTree handler only because the standard one takes no type handlers
        numpy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        types = ocp.type_handlers.create_type_handler_registry((np.ndarray, numpy))
        # 1 GB of arrays in flight (default 96): each one's compressed copy is built while it is written.
        state = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=types, save_concurrent_gb=1)
    handlers = {"state": state, "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
