"""Orbax checkpoints: async save of the train state plus a JSON item (counters, data-iterator state, config).

A checkpoint named ``k`` holds the state after ``k`` batches, so a resumed run starts at batch ``k`` and reads
exactly the batches an uninterrupted run would have read. Orbax writes into a ``*.orbax-checkpoint-tmp`` folder and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest one. What orbax does not
do (``../shared/reference/reliability.md`` E12-E17), this module adds:

- a writer lock (``folder_lock.py``): a second run on the same folder would delete the first one's tmp folders;
- ``manifest.json`` in every step folder (``integrity.py``): size and crc32 of each file, named by the array it
  stores (orbax has no data checksum; the state is saved without OCDBT so each array has its own chunk files);
- ``restore_latest``: verifies the newest step, sets a corrupt one aside (``<step>.corrupt-<time>``) and falls back
  step by step; a step without a manifest is passed over for a verified one unless ``ckpt.restore_unverified``
  (then sealed once restored); a folder holding only set-aside steps keeps refusing, so a restart loop never turns
  a corrupt checkpoint into a fresh start;
- a step listing (``step_folders.py``, also orbax's) of folders one save wrote in full;
- restores by array name (``arrays.py``): saved shapes checked first, a mismatch names every array; a checkpoint
  may hold a subset of the state (params only, from ``tools/convert_checkpoint.py``);
- rolling snapshots (``ckpt.oss_snapshot_freq``) in ``ckpt.snapshot_ckpt_folder`` (default ``<save>/snapshot``), a
  second orbax manager keeping the newest two (``ckpt.max_to_keep`` counts regular checkpoints only);
- async save errors (disk full, EFBIG, I/O) raised as ``CheckpointError`` naming the step, folder and OS error,
  orbax's cached step list refreshed and its own tracebacks kept off the console (DEBUG).

What a run starts from (auto_resume, ``load_ckpt_info``) is decided in ``plan.py``, the stop file is
``stop_file.py``; orbax's own set-up is ``orbax_setup.py``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from internevo_jax.checkpoint.arrays import array_names, check_fits, read_arrays, read_meta, saved_arrays
from internevo_jax.checkpoint.folder_lock import LOCK, FolderLock, lock_on_process_0
from internevo_jax.checkpoint.integrity import (
    MANIFEST,
    UNVERIFIED,
    seal_restored,
    unverified_message,
    verify_step,
    warn_unverified,
    write_manifest,
)
from internevo_jax.checkpoint.orbax_setup import orbax_manager, quiet_orbax_tracebacks
from internevo_jax.checkpoint.step_folders import (
    is_foreign,
    is_tmp,
    quarantined,
    quarantined_message,
    scan_steps,
    set_aside,
    step_dirs,
    step_problem,
)
from internevo_jax.config import local_path
from internevo_jax.errors import CheckpointError, CheckpointMismatch, LockError
from internevo_jax.monitoring.logger import get_logger

SNAPSHOTS_KEPT = 2  # InternEvo's two alternating slots: one may be half-written, the other is whole


class Checkpointer:
    """Saves and restores train states under ``ckpt.save_ckpt_folder`` (``local:`` prefix or a plain path).

    One save is in flight at a time: orbax writes it in the background, then a "seal" thread of ours waits for
    orbax's commit and writes the step's manifest (checksums read back from disk, so they cover what was written).
    The next ``save`` (or ``close``) joins that thread; it has normally finished long before, so the training loop
    only waits when checkpoints come faster than they can be written, as it would with orbax alone.

    ``borrow_host_arrays=True`` (``tools/convert_checkpoint.py``) saves states of numpy arrays straight from the
    caller's memory: orbax otherwise copies every host array first (a second copy of the model), to guard against
    changes while it writes, so the caller must leave them alone until ``wait_until_finished`` or ``close``.
    """

    def __init__(self, ckpt: ml_collections.ConfigDict, job_name: str | None = None, borrow_host_arrays: bool = False):
        self.directory = Path(local_path(ckpt.save_ckpt_folder)).absolute()
        self.every = ckpt.checkpoint_every
        freq = ckpt.oss_snapshot_freq
        self.snapshot_every = int(freq) if freq != float("inf") and freq > 1 else None  # InternEvo: freq > 1 (CK-05)
        folder = ckpt.snapshot_ckpt_folder
        self.snapshot_directory = Path(local_path(folder)).absolute() if folder else self.directory / "snapshot"
        self.log = get_logger()
        quiet_orbax_tracebacks()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(
                f"cannot create the checkpoint folder {self.directory}: {type(e).__name__}: {e}. Fix its parent's "
                "permissions or point ckpt.save_ckpt_folder at a writable folder"
            ) from None
        # The lock comes before the managers: creating one deletes tmp folders, which may be a live run's save.
        self._lock = FolderLock(self.directory / LOCK, job_name)
        try:
            lock_on_process_0(self._lock, self.directory)
        except LockError as e:
            raise CheckpointError(str(e)) from None
        self.borrow = borrow_host_arrays
        self.restore_unverified = bool(ckpt.restore_unverified)
        try:
            self.manager = orbax_manager(self.directory, ckpt.max_to_keep, borrow_host_arrays)
            # Snapshots left by an earlier run count for resuming even when this config takes none.
            self.snapshots = (
                orbax_manager(self.snapshot_directory, SNAPSHOTS_KEPT, borrow_host_arrays)
                if self.snapshot_every or step_dirs(self.snapshot_directory)
                else None
            )
        except BaseException:
            self._lock.release()
            raise
        self._sealer: threading.Thread | None = None
        # (step, what failed, error, the orbax manager) from the sealer thread
        self._failure: tuple[int, str, BaseException, ocp.CheckpointManager] | None = None
        self._closed = False
        self.restored_from: Path | None = None  # the step folder restore_latest restored
        self.latest_step = self.manager.latest_step

    def due(self, batches_done: int, total_steps: int) -> bool:
        """InternEvo saves every ``checkpoint_every`` steps and always at the last one."""
        return batches_done % self.every == 0 or batches_done == total_steps

    def snapshot_due(self, batches_done: int) -> bool:
        """A snapshot every ``oss_snapshot_freq`` batches (a regular checkpoint due at the same step wins)."""
        return self.snapshot_every is not None and batches_done % self.snapshot_every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any], snapshot: bool = False) -> None:
        """Starts an async save; device buffers are copied before this returns, so the state may be donated next.

        ``snapshot=True`` writes into the snapshot folder instead (the newest two snapshots are kept). Raises
        ``CheckpointError`` if the previous save failed in the background (disk full, I/O error): a run must not
        train on for days without checkpoints. The previous complete checkpoint stays intact; the error names the
        failed step, the folder and the OS error.
        """
        self.wait_until_finished()
        manager = self.snapshots if snapshot else self.manager
        if manager is None:
            raise ValueError("snapshot save without ckpt.oss_snapshot_freq")
        entry = Path(manager.directory) / str(step)
        why = step_problem(entry) if os.path.lexists(entry) else None
        if why is not None:  # orbax would fail renaming its tmp folder onto it, after writing the whole step
            raise CheckpointError(
                f"cannot save checkpoint step {step}: {entry} is in the way ({why}) and is not this run's to move. "
                f"Move it out of {manager.directory}, then restart: the previous checkpoint is intact"
            )
        item = ocp.args.PyTreeSave(state) if self.borrow else ocp.args.StandardSave(state)
        args = ocp.args.Composite(state=item, meta=ocp.args.JsonSave(meta))
        try:
            manager.save(step, args=args, force=True)
        except Exception as e:  # the synchronous part: creating the tmp folder, writing metadata, ...
            self._refresh()
            raise CheckpointError(self._failed_message(step, "save", e, manager)) from e
        self._sealer = threading.Thread(target=self._seal, args=(step, manager), name=f"checkpoint-seal-{step}")
        self._sealer.start()

    def wait_until_finished(self) -> None:
        """Blocks until the last save is committed and sealed; raises ``CheckpointError`` if it failed."""
        failure = self._join()
        if failure is not None:
            self._refresh()
            raise CheckpointError(self._failed_message(*failure)) from failure[2]

    def wait_pending(self, timeout: float | None) -> bool:
        """For error paths: waits at most ``timeout`` seconds (None: no limit) for the save in flight to be
        committed and sealed. True when none is left writing (a failure is raised by ``close``); never raises."""
        sealer = self._sealer
        if sealer is not None:
            sealer.join(timeout)
            return not sealer.is_alive()
        return True

    def restore(self, step: int, abstract_state: Any, partial: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restores regular checkpoint ``step`` straight into the shardings of ``abstract_state``.

        ``abstract_state`` holds ShapeDtypeStructs with shardings. The files are checked against the step's manifest
        first; a mismatch raises ``CheckpointError``, and so does a step without a manifest unless
        ``ckpt.restore_unverified`` (then it is sealed once restored). ``partial=True`` accepts a checkpoint that
        holds only some of the arrays (the others come back as None); shapes must fit either way
        (``CheckpointMismatch``).
        """
        root = self._step_dir(step)
        problem = verify_step(root)
        if problem == UNVERIFIED and not self.restore_unverified:
            raise CheckpointError(unverified_message([root]))
        if problem is not None and problem != UNVERIFIED:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {problem}")
        if problem == UNVERIFIED:
            warn_unverified(root, self.log)
        restored = self._restore(root, abstract_state, partial)
        if problem == UNVERIFIED:
            seal_restored(root, step, self.log)
        return restored

    def restore_latest(self, abstract_state: Any, partial: bool = False) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest usable checkpoint or snapshot as ``(step, state, meta)``; None when there is none.

        A step whose files do not match its manifest is logged (ERROR, naming the array and file), moved aside to
        ``<step>.corrupt-<time>`` (kept for inspection, and so that saving that step again later does not collide)
        and the next older step is tried. When checkpoints exist but none is usable this raises rather than
        returning None: silently training from scratch would throw away a run; and so does a folder holding only
        steps an earlier start moved aside, so that a restart loop (SLURM requeue, Kubernetes) keeps refusing until
        a person decides (``ckpt.auto_resume=False``, or removing them). A checkpoint that does not fit the config
        raises ``CheckpointMismatch`` at once (an older one would not fit either). The folder the step came from is
        ``self.restored_from``.

        A step without a manifest (killed between orbax's commit and the manifest write, or written by an older
        version) cannot be checked: a flipped bit would restore silently. Unless ``ckpt.restore_unverified``, it is
        passed over for an older verified step (and then moved to ``<step>.unverified-<time>``, as a later save of
        that step would collide with it), and with no verified step this raises; with the key it is restored with a
        warning and sealed (its manifest written), so that later restores check it.

        Entries named like a step that are no checkpoint (``step_folders``: a symlink, a folder of ours without
        orbax's metadata or with files gone) are logged and moved aside the same way; a leftover tmp folder is
        logged and left alone, and so is a folder no save of ours wrote (a user's numbered folder).
        """
        rejected = []
        skipped = [entry for d in self._directories() for entry in scan_steps(d)[1]]
        for root, why in skipped:
            if is_tmp(root):  # orbax deletes its tmp folders when the manager starts; one left is not ours to move
                self.log.warning(f"{root} is not a checkpoint: {why}; skipped it")
            elif is_foreign(root):
                self.log.warning(
                    f"{root} is not a checkpoint: {why}, and no save of ours wrote it, so it is left alone; a save of "
                    f"step {root.name.partition('.')[0]} would collide with it: move it out of {root.parent} before "
                    "the run gets there"
                )
        # The others are moved aside like corrupt steps: a later save of that step would collide with them (orbax
        # renames its tmp folder onto the step's name).
        junk = [(root, why) for root, why in skipped if not is_tmp(root) and not is_foreign(root)]
        for (root, why), aside in zip(junk, self._quarantine([root for root, _ in junk]), strict=True):
            self.log.error(f"{root} is not a usable checkpoint: {why}; moved it to {aside}")
            rejected.append(f"step {root.name}: {why}")
        unverified: list[Path] = []  # newer steps without a manifest, passed over
        for step, manager in self._candidates():
            root = Path(manager.directory) / str(step)
            problem = verify_step(root)
            if problem == UNVERIFIED and not self.restore_unverified:
                unverified.append(root)
                continue
            if problem == UNVERIFIED:
                warn_unverified(root, self.log)
                try:
                    state, meta = self._restore(root, abstract_state, partial)
                except CheckpointMismatch:
                    raise
                except CheckpointError as e:  # half-deleted (killed during retention): moved aside, never deleted
                    problem = str(e.__cause__ or e)
                else:
                    seal_restored(root, step, self.log)
                    return self._restored(root, step, state, meta, unverified)
            elif problem is None:
                # Files verified: an orbax error now means the target (config) does not fit the checkpoint, and an
                # older step would not fit either, so _restore raises instead of falling back.
                state, meta = self._restore(root, abstract_state, partial)
                return self._restored(root, step, state, meta, unverified)
            (aside,) = self._quarantine([root])
            self.log.error(
                f"checkpoint step {step} in {manager.directory} is not usable: {problem}; moved it to {aside} "
                "and falling back to an older step"
            )
            rejected.append(f"step {step}: {problem}")
        if unverified:
            raise CheckpointError(unverified_message(unverified, rejected))
        if rejected:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: {'; '.join(rejected)}. The rejected steps were moved to "
                "<step>.corrupt-<time>; set ckpt.auto_resume=False to start from scratch, or move a folder back"
            )
        moved = [p for d in self._directories() for p in quarantined(d)]
        if moved:
            raise CheckpointError(quarantined_message(self.directory, moved))
        return None

    def _restored(
        self, root: Path, step: int, state: Any, meta: dict[str, Any], unverified: list[Path]
    ) -> tuple[int, Any, dict[str, Any]]:
        """Records where the state came from; newer steps passed over for lack of a manifest are moved aside."""
        for skipped, aside in zip(unverified, self._quarantine(unverified, "unverified"), strict=True):
            self.log.warning(
                f"checkpoint step {skipped.name} in {skipped.parent} has no {MANIFEST}, so its files cannot be "
                f"checked: restored the verified step {step} instead and moved it to {aside} (a flipped bit there "
                "would restore silently). Set ckpt.restore_unverified=True to resume such a step; it is then sealed"
            )
        self.restored_from = root
        return step, state, meta

    def reached_preemption(self, step: int) -> bool:
        """True once every process has agreed to stop at ``step`` after a SIGTERM (needs jax.distributed)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the last save and its manifest, then releases the lock; raises if that save failed."""
        if self._closed:
            return
        self._closed = True
        failure = self._join()
        try:
            if failure is not None:
                self._refresh()
            for manager in self._managers():
                manager.close()
        finally:
            self._lock.release()
        if failure is not None:
            raise CheckpointError(self._failed_message(*failure))

    # ------------------------------------------------------------------------------------------------------------
    def _managers(self) -> list[ocp.CheckpointManager]:
        return [self.manager] + ([self.snapshots] if self.snapshots is not None else [])

    def _directories(self) -> list[Path]:
        return [Path(manager.directory) for manager in self._managers()]

    def _candidates(self) -> list[tuple[int, ocp.CheckpointManager]]:
        """Every listed step, newest first; a regular checkpoint before a snapshot of the same step."""
        found = []
        for rank, manager in enumerate(self._managers()):
            manager.reload()  # the cached step list can be stale (a failed save, another process's changes)
            found += [(step, rank, manager) for step in manager.all_steps()]
        return [(step, manager) for step, _, manager in sorted(found, key=lambda x: (-x[0], x[1]))]

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _restore(self, root: Path, abstract_state: Any, partial: bool) -> tuple[Any, dict[str, Any]]:
        targets = array_names(abstract_state)
        try:
            if partial:
                saved = saved_arrays(root)
                wanted = {name: t for name, t in targets.items() if name in saved}
            else:
                wanted = targets
            check_fits(root, wanted, targets)
            arrays = read_arrays(root, wanted)
            meta = read_meta(root)
        except CheckpointMismatch:
            raise
        except Exception as e:
            raise CheckpointError(f"restoring checkpoint {root} failed: {e}") from e
        leaves = [arrays.get(name) for name in targets]
        return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves), meta

    def _seal(self, step: int, manager: ocp.CheckpointManager) -> None:
        """Seal thread: waits for orbax's commit of ``step``, then writes its manifest (process 0)."""
        try:
            manager.wait_until_finished()  # re-raises the async writer's error (ENOSPC, EFBIG, ...)
        except BaseException as e:
            self._failure = (step, "save", e, manager)
            return
        if jax.process_index() != 0:
            return
        try:
            write_manifest(Path(manager.directory) / str(step), step, self.log)
        except BaseException as e:
            self._failure = (step, "manifest", e, manager)

    def _join(self) -> tuple[int, str, BaseException, ocp.CheckpointManager] | None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        failure, self._failure = self._failure, None
        return failure

    def _refresh(self) -> None:
        """After a failed save: drop orbax's pending error and re-read the step list from disk (E13)."""
        for manager in self._managers():
            try:
                # Orbax re-raises a failed save once per calling thread; it is reported already, so take it here
                # once instead of from the next manager.save().
                manager.wait_until_finished()
            except Exception:
                pass  # reported by the caller
            manager.reload()

    def _failed_message(self, step: int, what: str, error: BaseException, manager: ocp.CheckpointManager) -> str:
        folder = manager.directory
        if what == "manifest":
            return (
                f"checkpoint step {step} in {folder} was saved but its {MANIFEST} could not be written: "
                f"{error}. The step will restore unverified; fix the file system before going on"
            )
        steps = [s for m in self._managers() if (s := m.latest_step()) is not None]
        previous = max(steps) if steps else None
        return (
            f"checkpoint step {step} could not be saved to {folder}: {type(error).__name__}: {error}. "
            f"The previous checkpoint (step {previous}) is intact and a restart resumes from it; free space or fix "
            "the file system, then restart"
        )

    def _quarantine(self, roots: list[Path], label: str = "corrupt") -> list[Path]:
        """Moves rejected steps out of orbax's sight (kept for inspection or recovery); orbax re-lists its steps."""
        if not roots:
            return []
        asides = set_aside(roots, label)
        for manager in self._managers():
            manager.reload()
        return asides
