"""Orbax checkpoints: async save of the train state plus a JSON item (counters, data-iterator state, config).

A checkpoint named ``k`` holds the state after ``k`` batches, so a resumed run starts at batch ``k`` and reads
exactly the batches an uninterrupted run would have read. Orbax writes into a ``*.orbax-checkpoint-tmp`` folder and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the latest one. What orbax does not
do (``../shared/reference/reliability.md`` E12-E16), this module adds:

- a writer lock (``save_ckpt_folder/.lock``): a second run on the same folder would delete the first one's tmp
  folders and interleave steps;
- ``manifest.json`` in every step folder: size and crc32 of each file, named by the array it stores. Orbax has no
  data checksum, so a flipped bit restores silently with wrong values. The state is saved without OCDBT so that
  each array has its own folder of chunk files (``state/<array path>/<chunk>``; OCDBT packs all arrays into shared
  ``d/<hash>`` files), which lets a checksum mismatch name the array;
- ``restore_latest``: verifies the newest step, moves a corrupt one aside (``<step>.corrupt-<time>``) and falls
  back step by step;
- async save errors (disk full, EFBIG, I/O errors) raised as ``CheckpointError`` naming the step, the folder and
  the OS error, with orbax's cached step list refreshed (it otherwise keeps listing the failed step).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from internevo_jax.config import local_path
from internevo_jax.metrics import get_logger

MANIFEST = "manifest.json"
LOCK = ".lock"
_BLOCK = 16 << 20  # read files in 16 MiB blocks: bounded memory, and zlib releases the GIL on each block


class CheckpointError(RuntimeError):
    """A checkpoint could not be locked, saved or restored; the message says which step, folder and why."""


class Checkpointer:
    """Saves and restores train states under ``ckpt.save_ckpt_folder`` (``local:`` prefix or a plain path).

    One save is in flight at a time: orbax writes it in the background, then a "seal" thread of ours waits for
    orbax's commit and writes the step's manifest (checksums read back from disk, so they cover what was written).
    The next ``save`` (or ``close``) joins that thread; it has normally finished long before, so the training loop
    only waits when checkpoints come faster than they can be written, as it would with orbax alone.
    """

    def __init__(self, ckpt: ml_collections.ConfigDict, job_name: str | None = None):
        self.directory = Path(local_path(ckpt.save_ckpt_folder)).absolute()
        self.every = ckpt.checkpoint_every
        self.log = get_logger()
        self.directory.mkdir(parents=True, exist_ok=True)
        # The lock comes before the manager: creating one deletes tmp folders, which may be a live run's save.
        self._lock = _Lock(self.directory / LOCK, job_name)
        _lock_on_process_0(self._lock, self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt.max_to_keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # a save killed mid-way leaves a tmp folder; drop it on the next start
            create=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False), "meta": ocp.JsonCheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except BaseException:
            self._lock.release()
            raise
        self._sealer: threading.Thread | None = None
        self._failure: tuple[int, str, BaseException] | None = None  # (step, what failed, error) from the sealer
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, batches_done: int, total_steps: int) -> bool:
        """InternEvo saves every ``checkpoint_every`` steps and always at the last one."""
        return batches_done % self.every == 0 or batches_done == total_steps

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save; device buffers are copied before this returns, so the state may be donated next.

        Raises ``CheckpointError`` if the previous save failed in the background (disk full, I/O error): a run must
        not train on for days without checkpoints. The previous complete checkpoint stays intact; the error names
        the failed step, the folder and the OS error.
        """
        self.wait_until_finished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # the synchronous part: creating the tmp folder, writing metadata, ...
            self._refresh()
            raise CheckpointError(self._failed_message(step, "save", e)) from e
        self._sealer = threading.Thread(target=self._seal, args=(step,), name=f"checkpoint-seal-{step}")
        self._sealer.start()

    def wait_until_finished(self) -> None:
        """Blocks until the last save is committed and sealed; raises ``CheckpointError`` if it failed."""
        failure = self._join()
        if failure is not None:
            self._refresh()
            raise CheckpointError(self._failed_message(*failure)) from failure[2]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` straight into the shardings of ``abstract_state`` (ShapeDtypeStructs with shardings).

        The files are checked against the step's manifest first; a mismatch raises ``CheckpointError``.
        """
        problem = self._verify(step)
        if problem is not None and problem != _UNVERIFIED:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {problem}")
        if problem == _UNVERIFIED:
            self._warn_unverified(step)
        return self._restore(step, abstract_state)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest usable checkpoint as ``(step, state, meta)``; None when the folder holds no checkpoint.

        A step whose files do not match its manifest is logged (ERROR, with the array and file), moved aside to
        ``<step>.corrupt-<time>`` (kept for inspection, and so that saving that step again later does not collide)
        and the next older step is tried. When checkpoints exist but none is usable this raises rather than
        returning None: silently training from scratch would throw away a run.
        """
        self.manager.reload()  # the cached step list can be stale (a failed save, another process's changes)
        rejected = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._verify(step)
            if problem == _UNVERIFIED:
                self._warn_unverified(step)
                try:
                    state, meta = self._restore(step, abstract_state)
                except CheckpointError as e:  # half-deleted (killed during retention), or not fitting the config:
                    problem = str(e.__cause__)  # either way it is moved aside, never deleted
                else:
                    return step, state, meta
            elif problem is None:
                # Files verified: an orbax error now means the target (config) does not fit the checkpoint, and an
                # older step would not fit either, so _restore raises instead of falling back.
                state, meta = self._restore(step, abstract_state)
                return step, state, meta
            aside = self._quarantine(step)
            self.log.error(
                f"checkpoint step {step} in {self.directory} is not usable: {problem}; moved it to {aside} "
                "and falling back to an older step"
            )
            rejected.append(f"step {step}: {problem}")
        if rejected:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: {'; '.join(rejected)}. The rejected steps were moved to "
                "<step>.corrupt-<time>; set ckpt.auto_resume=False to start from scratch, or move a folder back"
            )
        return None

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
            self.manager.close()
        finally:
            self._lock.release()
        if failure is not None:
            raise CheckpointError(self._failed_message(*failure))

    # ------------------------------------------------------------------------------------------------------------
    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"restoring checkpoint step {step} from {self.directory} failed: {e}") from e
        return out["state"], out["meta"]

    def _seal(self, step: int) -> None:
        """Seal thread: waits for orbax's commit of ``step``, then writes its manifest (process 0)."""
        try:
            self.manager.wait_until_finished()  # re-raises the async writer's error (ENOSPC, EFBIG, ...)
        except BaseException as e:
            self._failure = (step, "save", e)
            return
        if jax.process_index() != 0:
            return
        try:
            _write_manifest(self._step_dir(step), step, self.log)
        except BaseException as e:
            self._failure = (step, "manifest", e)

    def _join(self) -> tuple[int, str, BaseException] | None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        failure, self._failure = self._failure, None
        return failure

    def _refresh(self) -> None:
        """After a failed save: drop orbax's pending error and re-read the step list from disk (E13)."""
        try:
            # Orbax re-raises a failed save once per calling thread; it is reported already, so take it here once
            # instead of from the next manager.save().
            self.manager.wait_until_finished()
        except Exception:
            pass  # reported by the caller
        self.manager.reload()

    def _failed_message(self, step: int, what: str, error: BaseException) -> str:
        if what == "manifest":
            return (
                f"checkpoint step {step} in {self.directory} was saved but its {MANIFEST} could not be written: "
                f"{error}. The step will restore unverified; fix the file system before going on"
            )
        previous = self.manager.latest_step()
        return (
            f"checkpoint step {step} could not be saved to {self.directory}: {type(error).__name__}: {error}. "
            f"The previous checkpoint (step {previous}) is intact and a restart resumes from it; free space or fix "
            "the file system, then restart"
        )

    def _warn_unverified(self, step: int) -> None:
        # Policy: a step without a manifest was committed by orbax (the folder was renamed only when complete), and
        # the run stopped in the seconds before its manifest was written (kill -9, node loss). Rejecting it would
        # throw away the work of a whole checkpoint interval to guard against bit rot in a seconds-old folder;
        # checkpoints written by older versions have no manifest either.
        self.log.warning(
            f"checkpoint step {step} in {self.directory} has no {MANIFEST} (the run stopped between "
            "orbax's commit and the manifest write, or an older version wrote it): restoring it unverified"
        )

    def _verify(self, step: int) -> str | None:
        """None when the step's files match its manifest, ``_UNVERIFIED`` without a manifest, else what is wrong.

        With several processes each checks a slice of the files and all agree on the verdict.
        """
        root = self._step_dir(step)
        if root.is_symlink():
            problem = f"{root} is a symlink, not a checkpoint folder"
        elif not (root / MANIFEST).is_file():
            return _UNVERIFIED  # the same answer on every process (a shared file system)
        else:
            problem = _check_files(root, jax.process_index(), jax.process_count())
        if jax.process_count() > 1:
            bad = multihost_utils.process_allgather(np.array([problem is not None]))
            if problem is None and bool(np.any(bad)):
                problem = "corrupt files found by another process (see its log)"
        return problem

    def _quarantine(self, step: int) -> Path:
        """Moves a rejected step out of orbax's sight; it is kept, not deleted, for inspection or recovery."""
        aside = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.rename(self._step_dir(step), aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"internevo_jax checkpoint quarantine {step}")
        self.manager.reload()
        return aside


_UNVERIFIED = "no manifest"


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (restore places arrays straight onto the current mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------------------------------------------
# Manifest. crc32 (zlib) because it is the fastest checksum in the standard library (~3 GB/s a core here, against
# ~1.1 for sha256 and ~0.6 for blake2b), it catches every 1-bit flip and every burst up to 32 bits, and the threat is
# bit rot and truncation, not an adversary. A 7B model with Adam (~84 GB) takes ~30 s of one core, off the loop.
# Process 0 seals the whole step (after orbax's commit every process's files are on the shared file system).


def _array_of(rel: str) -> str:
    """The array a file belongs to: ``state/<array path>/<chunk>`` (no OCDBT), ``meta`` or orbax metadata."""
    parts = rel.split("/")
    if parts[0] == "state" and len(parts) > 2:
        return parts[1]
    return "meta" if parts[0] == "meta" else "(orbax metadata)"


def _crc32(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def _write_manifest(root: Path, step: int, log: Any) -> None:
    """Writes ``root/manifest.json`` atomically (temp file, fsync, rename): it exists whole or not at all."""
    t0 = time.time()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST))
    entries = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        size, crc = _crc32(p)
        entries[rel] = dict(array=_array_of(rel), size=size, crc32=crc)
    tmp = root / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(format=1, step=step, checksum="crc32", files=entries), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    megabytes, seconds = sum(e["size"] for e in entries.values()) / 1e6, time.time() - t0
    log.info(f"checkpoint step {step} sealed: {len(entries)} files, {megabytes:.1f} MB checksummed in {seconds:.1f}s")


def _check_files(root: Path, index: int, count: int) -> str | None:
    """Checks this process's share of the files listed in ``root/manifest.json``; the first problem, or None."""
    try:
        entries = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    mine = sorted(entries)[index::count]

    def check(rel: str) -> str | None:
        e = entries[rel]
        where = f"array {e['array']!r} file {rel}"
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or path.is_symlink():
            return f"{where}: not a plain file inside the step folder"
        try:
            size = path.stat().st_size
            if size < e["size"]:
                return f"{where}: truncated to {size} of {e['size']} bytes"
            if size > e["size"]:
                return f"{where}: {size} bytes, {e['size']} expected"
            _, crc = _crc32(path)
        except FileNotFoundError:
            return f"{where}: missing"
        except OSError as err:
            return f"{where}: unreadable ({err})"
        return None if crc == e["crc32"] else f"{where}: checksum mismatch (crc32 {crc:08x}, {e['crc32']:08x} saved)"

    # Stat everything first (cheap) so a truncated or missing file is found before reading gigabytes.
    for rel in mine:
        p = root / rel
        if not p.is_file() or p.stat().st_size != entries[rel]["size"]:
            return check(rel)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return next((p for p in pool.map(check, mine) if p is not None), None)


# ----------------------------------------------------------------------------------------------------------------
# Writer lock. A file created with O_EXCL (atomic on local and NFSv3+ file systems) holding who wrote it; unlike
# flock it also works where locks are not supported (Lustre without -o flock) and says who holds it.


class _Lock:
    def __init__(self, path: Path, job_name: str | None):
        self.path = path
        self.held = False
        self.info = dict(
            host=socket.gethostname(),
            pid=os.getpid(),
            job=job_name or os.environ.get("SLURM_JOB_NAME"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            since=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            token=uuid.uuid4().hex,  # so release() never deletes a lock that someone else took over
        )

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock taken over, or a holder that released it as we looked
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(self.path)
                if holder is None and self.path.exists():
                    raise CheckpointError(self._held_message({})) from None
                if holder is not None:
                    if not self._stale(holder):
                        raise CheckpointError(self._held_message(holder)) from None
                    self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            atexit.register(self.release)  # a run that dies of an exception without close() still frees the folder
            return
        raise CheckpointError(f"could not take the checkpoint lock {self.path}: it keeps changing hands")

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.info["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, TypeError, ValueError):
                pass  # alive under another user, or a lock we cannot read: not ours to take
            return False
        # A requeued SLURM job keeps its id and bumps its restart count; its earlier incarnation is gone.
        same_job = holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.info["slurm_job_id"]
        return bool(same_job) and int(holder.get("slurm_restart_count", 0)) < self.info["slurm_restart_count"]

    def _take_over(self, holder: dict) -> None:
        who = ", ".join(f"{k}={holder.get(k)}" for k in ("host", "pid", "job", "since"))
        get_logger().warning(f"taking over the stale checkpoint lock {self.path}: its holder ({who}) is gone")
        # Rename, not unlink: if another starter replaced the stale lock in the meantime, we can put theirs back.
        aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_json(aside) != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

    def _held_message(self, holder: dict) -> str:
        who = ", ".join(f"{k}={holder.get(k)}" for k in ("host", "pid", "job", "since")) if holder else "unreadable"
        return (
            f"checkpoint folder {self.path.parent} is in use by another run ({who}). Two runs writing one folder "
            f"corrupt each other's checkpoints. Stop the other run, point this one at another ckpt.save_ckpt_folder, "
            f"or, if that run is dead, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            atexit.unregister(self.release)
            if (_read_json(self.path) or {}).get("token") == self.info["token"]:
                self.path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _lock_on_process_0(lock: _Lock, directory: Path) -> None:
    """Process 0 takes the lock for the whole job; every process raises if it could not (no one is left waiting)."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except CheckpointError as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = CheckpointError(f"process 0 could not lock the checkpoint folder {directory}; see its log")
    if error is not None:
        raise error
