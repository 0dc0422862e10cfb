"""Orbax checkpoints: async save of the train state plus a JSON item (counters, data-iterator state, config).

A checkpoint named ``k`` holds the state after ``k`` batches, so a resumed run starts at batch ``k`` and reads
exactly the batches an uninterrupted run would have read. Orbax writes into a ``*.orbax-checkpoint-tmp`` folder and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from internevo_jax.config import local_path


class Checkpointer:
    """Saves and restores train states under ``ckpt.save_ckpt_folder`` (``local:`` prefix or a plain path)."""

    def __init__(self, ckpt: ml_collections.ConfigDict):
        self.directory = Path(local_path(ckpt.save_ckpt_folder)).absolute()
        self.every = ckpt.checkpoint_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt.max_to_keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # a save killed mid-way leaves a tmp folder; drop it on the next start
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, batches_done: int, total_steps: int) -> bool:
        """InternEvo saves every ``checkpoint_every`` steps and always at the last one."""
        return batches_done % self.every == 0 or batches_done == total_steps

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save; device buffers are copied before this returns, so the state may be donated next."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` straight into the shardings of ``abstract_state`` (ShapeDtypeStructs with shardings)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["meta"]

    def reached_preemption(self, step: int) -> bool:
        """True once every process has agreed to stop at ``step`` after a SIGTERM (needs jax.distributed)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (restore places arrays straight onto the current mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
