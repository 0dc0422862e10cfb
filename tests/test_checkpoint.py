"""Checkpoint faults: the writer lock, checksums with fallback, disk full, and restore onto another mesh."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from internevo_jax.checkpoint.arrays import abstract_with_shardings
from internevo_jax.checkpoint.folder_lock import LOCK
from internevo_jax.checkpoint.integrity import MANIFEST
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.checkpoint.plan import find_step
from internevo_jax.checkpoint.step_folders import step_dirs
from internevo_jax.config import default_config
from internevo_jax.errors import CheckpointError

from .conftest import ROOT


def ckpt_config(folder, **overrides):
    ckpt = default_config().ckpt
    ckpt.update(dict(save_ckpt_folder=f"local:{folder}", checkpoint_every=1, max_to_keep=None) | overrides)
    return ckpt


def make_state(seed: int, mesh) -> dict:
    w = jax.random.normal(jax.random.key(seed), (64, 32))
    return {
        "params": {"w": jax.device_put(w, NamedSharding(mesh, P("d"))), "b": jnp.full((5,), float(seed))},
        "count": jnp.int32(seed),
    }


def abstract_of(state, shardings=None):
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return abstract_with_shardings(abstract, shardings or jax.tree.map(lambda a: a.sharding, state))


def assert_same(got, want):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want))


@pytest.fixture
def mesh():
    return jax.make_mesh((8,), ("d",))


def messages(records, level):
    return "\n".join(r.getMessage() for r in records if r.levelno == level)


def save_two_steps(folder, mesh):
    ck = Checkpointer(ckpt_config(folder))
    states = {step: make_state(step, mesh) for step in (1, 2)}
    for step, state in states.items():
        ck.save(step, state, {"batch_count": step})
    ck.close()
    return states


# ---------------------------------------------------------------------------------------------------------------------
def test_second_writer_is_refused_and_close_releases(tmp_path):
    first = Checkpointer(ckpt_config(tmp_path))
    with pytest.raises(CheckpointError, match=rf"host={socket.gethostname()}, pid={os.getpid()}.*delete .*{LOCK}"):
        Checkpointer(ckpt_config(tmp_path))
    first.close()
    assert not (tmp_path / LOCK).exists()
    Checkpointer(ckpt_config(tmp_path)).close()


def test_stale_lock_is_taken_over_and_a_foreign_one_is_not(tmp_path, logs):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = dict(host=socket.gethostname(), pid=dead.pid, job="old", since="yesterday", token="x")
    (tmp_path / LOCK).write_text(json.dumps(stale))
    ck = Checkpointer(ckpt_config(tmp_path))
    assert f"pid={dead.pid}" in messages(logs, logging.WARNING)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    ck.close()

    # On another host we cannot tell whether the holder is alive: refuse.
    (tmp_path / LOCK).write_text(json.dumps(dict(stale, host="elsewhere")))
    with pytest.raises(CheckpointError, match="host=elsewhere"):
        Checkpointer(ckpt_config(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_step_falls_back_to_the_previous(tmp_path, mesh, logs, damage):
    states = save_two_steps(tmp_path, mesh)
    manifest = json.loads((tmp_path / "2" / MANIFEST).read_text())["files"]
    chunk = next(rel for rel, e in manifest.items() if e["array"] == "params.w" and not rel.endswith(".zarray"))
    path = tmp_path / "2" / chunk
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit: orbax alone restores this silently with wrong values (E12)
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))

    ck = Checkpointer(ckpt_config(tmp_path))
    with pytest.raises(CheckpointError, match="step 2 .*params.w"):
        ck.restore(2, abstract_of(states[2]))
    step, state, meta = ck.restore_latest(abstract_of(states[2]))
    assert step == 1 and meta == {"batch_count": 1}
    assert_same(state, states[1])
    errors = messages(logs, logging.ERROR)
    assert "step 2" in errors and f"array 'params.w' file {chunk}" in errors
    assert ("checksum mismatch" if damage == "flip" else "truncated") in errors
    # The bad step is moved aside, so the run can save step 2 again when it gets there.
    assert ck.latest_step() == 1 and len(list(tmp_path.glob("2.corrupt-*"))) == 1
    ck.save(2, states[2], {"batch_count": 2})
    ck.close()


def flip_a_bit(step_dir):
    chunk = next(p for p in sorted((step_dir / "state" / "params.w").iterdir()) if not p.name.startswith("."))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def test_step_without_manifest_is_passed_over_for_a_verified_one(tmp_path, mesh, logs):
    states = save_two_steps(tmp_path, mesh)
    (tmp_path / "2" / MANIFEST).unlink()  # as if killed between orbax's commit and the manifest write
    flip_a_bit(tmp_path / "2")  # ... or rotted: without a manifest nothing could tell
    ck = Checkpointer(ckpt_config(tmp_path))
    step, state, _ = ck.restore_latest(abstract_of(states[2]))
    assert step == 1
    assert_same(state, states[1])
    warnings = messages(logs, logging.WARNING)
    assert "step 2" in warnings and "restored the verified step 1 instead" in warnings
    assert "ckpt.restore_unverified=True" in warnings
    # Moved aside, so the run can save step 2 again; nothing is deleted.
    assert [p.name.split("-")[0] for p in tmp_path.glob("2.*")] == ["2.unverified"]
    ck.save(2, states[2], {"batch_count": 2})
    ck.close()


def test_reading_another_runs_folder_refuses_a_newer_step_without_manifest(tmp_path, mesh, logs):
    """``find_step`` (load_ckpt_info, the converter, generate): a newer manifest-less step is not taken over a verified
    older one without being asked (ckpt.restore_unverified); a root of manifest-less steps only gives its newest."""
    save_two_steps(tmp_path, mesh)
    (tmp_path / "2" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"newest step {tmp_path / '2'} has no manifest.json.*older step "):
        find_step(tmp_path)
    assert find_step(tmp_path, allow_unverified=True) == tmp_path / "2"
    assert f"checkpoint {tmp_path / '2'} has no manifest.json: loading it unverified" in messages(logs, logging.WARNING)
    (tmp_path / "1" / MANIFEST).unlink()  # an older version's checkpoint: no step has one
    assert find_step(tmp_path) == tmp_path / "2"
    assert find_step(tmp_path / "1") == tmp_path / "1"  # a step folder named directly


def test_only_unverified_steps_refuse_unless_opted_in_and_are_sealed_then(tmp_path, mesh, logs):
    states = save_two_steps(tmp_path, mesh)
    for step in (1, 2):
        (tmp_path / str(step) / MANIFEST).unlink()
    ck = Checkpointer(ckpt_config(tmp_path))
    refusal = r"has no manifest.json .*ckpt.restore_unverified=True.*auto_resume=False"
    with pytest.raises(CheckpointError, match=refusal):
        ck.restore_latest(abstract_of(states[2]))
    ck.close()
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 1]  # nothing moved: the next start refuses the same way

    ck = Checkpointer(ckpt_config(tmp_path, restore_unverified=True))
    step, state, _ = ck.restore_latest(abstract_of(states[2]))
    ck.close()
    assert step == 2
    assert_same(state, states[2])
    assert "restoring it unverified" in messages(logs, logging.WARNING)
    assert (tmp_path / "2" / MANIFEST).is_file()  # sealed: from now on a flipped bit is caught
    flip_a_bit(tmp_path / "2")
    ck = Checkpointer(ckpt_config(tmp_path, restore_unverified=True))
    with pytest.raises(CheckpointError, match="step 2 .*checksum mismatch"):
        ck.restore(2, abstract_of(states[2]))
    ck.close()


def test_no_usable_step_is_an_error_not_a_fresh_start(tmp_path, mesh):
    states = save_two_steps(tmp_path, mesh)
    for step in (1, 2):
        (tmp_path / str(step) / MANIFEST).write_text("{garbage")
    ck = Checkpointer(ckpt_config(tmp_path))
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step 2: manifest.json is unreadable.*step 1: "):
        ck.restore_latest(abstract_of(states[2]))
    ck.close()


def test_links_and_half_deleted_steps_are_not_checkpoints(tmp_path, mesh, logs):
    root = tmp_path / "ckpt"
    ck = Checkpointer(ckpt_config(root))
    states = {step: make_state(step, mesh) for step in (2, 3, 6)}
    for step, state in states.items():
        ck.save(step, state, {"batch_count": step})
    ck.close()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "3", elsewhere)
    (root / "9").symlink_to(root / "3")
    (root / "10").symlink_to(elsewhere)
    shutil.rmtree(root / "6" / "state" / "params.w")  # half-deleted: its manifest still lists the array's files
    (root / "8" / "state").mkdir(parents=True)  # no orbax metadata at all
    shutil.copytree(root / "3", root / "7.orbax-checkpoint-tmp")  # a save killed before orbax's rename
    why = {
        "10": f"a symlink (to {elsewhere}), not a step folder",
        "9": f"a symlink (to {root / '3'}), not a step folder",
        "8": "no orbax metadata",
        "6": "array 'params.w' file state/params.w/.zarray: missing",
    }
    assert [s for s, _ in step_dirs(root)] == [3, 2]

    # Read-only (another run's folder): skipped with a line each, nothing moved.
    assert find_step(root) == root / "3"
    warnings = messages(logs, logging.WARNING)
    for name, reason in why.items() | {("7.orbax-checkpoint-tmp", "an unfinished save")}:
        assert f"{root / name} is not a checkpoint: {reason}" in warnings, name
    assert sorted(p.name for p in root.iterdir()) == ["10", "2", "3", "6", "7.orbax-checkpoint-tmp", "8", "9"]

    ck = Checkpointer(ckpt_config(root))
    assert ck.manager.all_steps() == [2, 3]  # orbax's own listing (it would take 10 for the latest step)
    step, state, meta = ck.restore_latest(abstract_of(states[3]))
    assert step == 3 and meta == {"batch_count": 3}
    assert_same(state, states[3])
    errors = messages(logs, logging.ERROR)
    for name, reason in why.items():
        said = f"{root / name} is not a usable checkpoint: {reason}"
        assert re.search(re.escape(said) + f".*; moved it to {re.escape(str(root / name))}.corrupt-", errors), name
    # Moved aside, so saving those steps later does not collide (orbax deletes its tmp folders itself); the links'
    # targets are untouched.
    for step in (6, 7, 8, 9, 10):
        ck.save(step, states[2], {"batch_count": step})
    ck.close()
    assert [s for s, _ in step_dirs(root)] == [10, 9, 8, 7, 6, 3, 2]
    assert not list(root.glob("*tmp*"))
    assert (elsewhere / MANIFEST).is_file() and find_step(elsewhere) == elsewhere


def test_empty_folder_has_nothing_to_restore(tmp_path, mesh):
    ck = Checkpointer(ckpt_config(tmp_path))
    assert ck.restore_latest(abstract_of(make_state(0, mesh))) is None
    ck.close()


DISK_FULL = """
import resource, signal, sys
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from internevo_jax.checkpoint.manager import Checkpointer
from internevo_jax.errors import CheckpointError
from internevo_jax.config import default_config

mesh = jax.make_mesh((8,), ("d",))
ckpt = default_config().ckpt
ckpt.update(dict(save_ckpt_folder=sys.argv[1], checkpoint_every=1, max_to_keep=2))
ck = Checkpointer(ckpt)
state = lambda seed, rows: {"w": jax.device_put(jax.random.normal(jax.random.key(seed), (rows, 256)),
                                                NamedSharding(mesh, P("d")))}
ck.save(1, state(1, 64), {"step": 1})  # 8 KiB per file
ck.wait_until_finished()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, hard))
ck.save(2, state(2, 1024), {"step": 2})  # 128 KiB per file: the async write fails
try:
    ck.save(3, state(3, 64), {"step": 3})
except CheckpointError as e:
    print("ERROR:", e)
print("LATEST:", ck.latest_step())
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed: saving works again
ck.save(4, state(4, 64), {"step": 4})
ck.close()
"""


def test_disk_full_keeps_the_previous_checkpoint_and_says_why(tmp_path, mesh):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(folder)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR:"))
    assert "step 2 could not be saved" in error and str(folder) in error and "File too large" in error, error
    assert "previous checkpoint (step 1) is intact" in error
    assert "LATEST: 1" in out.stdout
    assert "Traceback" not in out.stderr, out.stderr  # one clear line, not orbax's tracebacks from every thread

    ck = Checkpointer(ckpt_config(folder))
    assert ck.manager.all_steps() == [1, 4]  # the failed step's tmp folder is not a step
    want = {"w": jax.random.normal(jax.random.key(1), (64, 256))}
    state, meta = ck.restore(1, abstract_of(want, {"w": NamedSharding(mesh, P("d"))}))
    ck.close()
    assert meta == {"step": 1}
    assert_same(state, want)


def test_restore_onto_another_mesh(tmp_path, mesh):
    saved = make_state(3, mesh)
    saved["replicated"] = jax.device_put(jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), NamedSharding(mesh, P()))
    ck = Checkpointer(ckpt_config(tmp_path))
    ck.save(3, saved, {})
    ck.close()

    other = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    target = {
        "params": {"w": NamedSharding(other, P("fsdp", "tensor")), "b": NamedSharding(other, P())},
        "count": NamedSharding(other, P()),
        "replicated": NamedSharding(other, P("tensor", "fsdp")),
    }
    ck = Checkpointer(ckpt_config(tmp_path))
    step, state, _ = ck.restore_latest(abstract_of(saved, target))
    ck.close()
    assert step == 3
    assert_same(state, saved)
    assert state["params"]["w"].sharding == target["params"]["w"]
    assert state["replicated"].sharding == target["replicated"]


# ---------------------------------------------------------------------------------------------------------------------
def test_a_restart_loop_keeps_refusing_while_quarantined_steps_exist(tmp_path, mesh):
    from internevo_jax import config as config_lib
    from internevo_jax.checkpoint.plan import plan_start

    ck = Checkpointer(ckpt_config(tmp_path))
    state = make_state(1, mesh)
    ck.save(1, state, {"batch_count": 1})
    ck.close()
    flip_a_bit(tmp_path / "1")  # the only checkpoint is corrupt
    ck = Checkpointer(ckpt_config(tmp_path))
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step 1: .*checksum mismatch"):
        ck.restore_latest(abstract_of(state))
    ck.close()
    assert not step_dirs(tmp_path) and len(list(tmp_path.glob("1.corrupt-*"))) == 1

    # The identical second start (SLURM requeue, Kubernetes restart) must not train from scratch.
    fix = r"only steps an earlier start set aside .*1\.corrupt-.*ckpt.auto_resume=False.*remove those folders"
    ck = Checkpointer(ckpt_config(tmp_path))
    with pytest.raises(CheckpointError, match=fix):
        ck.restore_latest(abstract_of(state))
    ck.close()
    overrides = [f"--config.ckpt.{k}" for k in (f"save_ckpt_folder=local:{tmp_path}", "checkpoint_every=1")]
    overrides.append("--config.ckpt.enable_save_ckpt=True")
    config = config_lib.load(ROOT / "configs" / "tiny.py", overrides)
    with pytest.raises(CheckpointError, match=fix):
        plan_start(config, {})
    config = config_lib.load(ROOT / "configs" / "tiny.py", overrides + ["--config.ckpt.auto_resume=False"])
    assert plan_start(config, {}).source == "fresh"


def test_numbered_folders_no_save_wrote_are_left_alone(tmp_path, mesh, logs):
    states = save_two_steps(tmp_path, mesh)
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "notes.txt").write_text("mine")
    (tmp_path / "4").write_text("a file")
    ck = Checkpointer(ckpt_config(tmp_path))
    step, _, _ = ck.restore_latest(abstract_of(states[2]))
    assert step == 2
    assert (tmp_path / "5" / "notes.txt").read_text() == "mine" and (tmp_path / "4").read_text() == "a file"
    assert not list(tmp_path.glob("*.corrupt-*"))
    warnings = messages(logs, logging.WARNING)
    assert f"{tmp_path / '5'} is not a checkpoint" in warnings and "left alone" in warnings
    assert "a save of step 5 would collide with it" in warnings
    with pytest.raises(CheckpointError, match=rf"cannot save checkpoint step 5: {tmp_path / '5'} is in the way"):
        ck.save(5, states[2], {"batch_count": 5})
    ck.close()
