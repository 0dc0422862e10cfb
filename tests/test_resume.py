"""Where a run starts from and how it stops: load_ckpt_info content, auto_resume precedence and its log line, shape
mismatches before compiling, snapshots, the stop file, and kill -9 during an async save (bit-exact resume)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from internevo_jax import Trainer
from internevo_jax import config as config_lib
from internevo_jax.checkpoint.arrays import read_meta
from internevo_jax.checkpoint.plan import find_step
from internevo_jax.checkpoint.step_folders import step_dirs
from internevo_jax.errors import CheckpointError, CheckpointMismatch

from .conftest import ROOT

STEPS = 12  # every run here trains the same 12 batches, so every loss can be compared with the golden run's


def load(*overrides):
    return config_lib.load(
        ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in (f"data.total_steps={STEPS}",) + overrides]
    )


def read_metrics(run_dir):
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the line a kill -9 cut short
            pass
    return {r["step"]: r for r in rows if "loss" in r}


def same_losses(rows, golden, steps):
    for s in steps:
        assert float(rows[s]["loss"]).hex() == float(golden[s]["loss"]).hex(), (s, rows[s]["loss"], golden[s]["loss"])


def assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def joined(records):
    return "\n".join(r.getMessage() for r in records)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """An uninterrupted run: its checkpoints (3, 6, 9, 12), final state and losses."""
    root = tmp_path_factory.mktemp("golden")
    ckpt = root / "ckpt"
    trainer = Trainer(
        load(
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='local:{ckpt}'",
            "ckpt.checkpoint_every=3",
            f"run_folder='{root}/run'",
        )
    )
    trainer.fit()
    return dict(ckpt=ckpt, state=trainer.state, rows=read_metrics(root / "run"))


def no_compile(monkeypatch):
    def fail(*_):
        raise AssertionError("compiled the train step before checking the checkpoint")

    monkeypatch.setattr(Trainer, "_step_for", fail)


# ---------------------------------------------------------------------------------------------------------------------
def test_load_model_and_scheduler_from_a_run_folder(golden, tmp_path, logs):
    ck = golden["ckpt"]
    trainer = Trainer(
        load(
            "ckpt.enable_save_ckpt=False",
            f"ckpt.load_ckpt_info=dict(path='local:{ck}', content=('model', 'scheduler'), ckpt_type='internevo')",
            f"run_folder='{tmp_path}/run'",
        )
    )
    state, meta = trainer.initial_state()
    want = golden["state"]  # the run folder -> its newest verified step, 12
    assert_equal(state.params, want.params)
    assert int(state.opt_state.count) == STEPS and meta["step_count"] == STEPS  # the lr schedule goes on
    adam = state.opt_state.inner_state[0]
    assert int(adam.count) == 0 and all(not np.asarray(m).any() for m in jax.tree.leaves(adam.mu))  # fresh moments
    assert meta["batch_count"] == 0 and meta["data_state"] is None  # the data starts over
    assert state.params["output"].sharding == trainer.shardings.params["output"]
    assert (
        f"load_ckpt_info: loaded model, scheduler from {ck}/12 (ckpt_type internevo, saved after batch 12); "
        "optimizer, sampler start fresh; ckpt.enable_save_ckpt=False" in joined(logs)
    )


def test_load_optimizer_and_sampler_keeps_fresh_weights(golden, tmp_path):
    ck = golden["ckpt"]
    trainer = Trainer(
        load(
            "ckpt.enable_save_ckpt=False",
            f"ckpt.load_ckpt_info=dict(path='{ck}', content=('OPTIMIZER', 'sampler'), ckpt_type='internevo')",
            f"run_folder='{tmp_path}/run'",
        )
    )
    state, meta = trainer.initial_state()
    want = golden["state"]
    assert_equal(state.params, trainer.states.init(trainer.states.key).params)  # the seed's weights
    assert_equal(state.opt_state.inner_state, want.opt_state.inner_state)  # moments and Adam's bias correction
    assert_equal(state.loss_scale, want.loss_scale)
    assert int(state.opt_state.count) == 0 and meta["step_count"] == 0  # the schedules start over
    saved = read_meta(ck / "12")
    assert meta["batch_count"] == STEPS and meta["data_state"] == saved["data_state"]
    assert meta["num_consumed_tokens"] == saved["num_consumed_tokens"]


def test_load_all_from_a_step_folder_continues_exactly(golden, tmp_path, logs):
    ck = golden["ckpt"]
    info = f"ckpt.load_ckpt_info=dict(path='{ck}/3', content='all', ckpt_type='internevo')"
    own = tmp_path / "own"
    summary = Trainer(
        load(
            info,
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='{own}'",
            "ckpt.checkpoint_every=100",
            f"run_folder='{tmp_path}/run'",
        )
    ).fit()
    assert summary["start_step"] == 3
    rows = read_metrics(tmp_path / "run")
    assert sorted(rows) == list(range(3, STEPS))
    same_losses(rows, golden["rows"], range(3, STEPS))
    assert (
        f"loaded model, optimizer, scheduler, sampler from {ck}/3 (ckpt_type internevo, saved after batch 3); "
        f"ckpt.auto_resume found no checkpoint in {own}" in joined(logs)
    )


@pytest.mark.parametrize("how", ["load_ckpt_info", "auto_resume"])
def test_shape_mismatch_fails_before_compiling_and_names_the_arrays(golden, tmp_path, monkeypatch, how):
    ck = golden["ckpt"]
    source = (
        ("ckpt.enable_save_ckpt=False", f"ckpt.load_ckpt_info=dict(path='{ck}', content=('model',))")
        if how == "load_ckpt_info"
        else ("ckpt.enable_save_ckpt=True", f"ckpt.save_ckpt_folder='{ck}'", "ckpt.checkpoint_every=3")
    )
    no_compile(monkeypatch)
    with pytest.raises(CheckpointMismatch) as e:
        Trainer(load("model.hidden_size=128", *source, f"run_folder='{tmp_path}/run'"))
    message = str(e.value)
    assert f"checkpoint {ck}/12 does not fit the config" in message
    assert (
        "params.layers.attention.wo: saved (2, 4, 16, 64) float32, the config expects (2, 4, 32, 128) float32"
        in message
    )
    assert "model.hidden_size=64" in message  # what the checkpoint was written with
    assert not (ck / ".lock").exists()  # refused before taking the run's folder


def test_content_the_checkpoint_lacks_and_bad_paths_are_errors(golden, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}/nope does not exist"):
        find_step(f"local:{tmp_path}/nope")
    (tmp_path / "empty" / "7.orbax-checkpoint-tmp").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"holds no usable checkpoint.*found \['7.orbax-checkpoint-tmp'\]"):
        find_step(tmp_path / "empty")
    assert find_step(golden["ckpt"]) == golden["ckpt"] / "12"


def test_legacy_load_keys_become_load_ckpt_info():
    cfg = load("ckpt.load_ckpt_folder='local:/ck/30'", "ckpt.load_optimizer=False", "ckpt.load_given_ckpt=True")
    assert cfg.ckpt.load_ckpt_info.to_dict() == dict(
        path="local:/ck/30", content=("model", "sampler"), ckpt_type="internevo"
    )
    assert cfg.ckpt.auto_resume is False
    cfg = load("ckpt.load_model_only_folder='/ck/30'")
    assert cfg.ckpt.load_ckpt_info.content == ("model",) and cfg.ckpt.auto_resume is True
    with pytest.raises(config_lib.ConfigError, match="set one of ckpt.load_ckpt_folder"):
        load("ckpt.load_model_only_folder='/a'", "ckpt.load_ckpt_folder='/b'")
    with pytest.raises(config_lib.ConfigError, match="oss_snapshot_freq must be a whole number"):
        load("ckpt.oss_snapshot_freq=2.5")


def test_snapshots_are_kept_apart_and_resumed_first(golden, tmp_path, logs):
    ck = tmp_path / "ckpt"
    overrides = (
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='{ck}'",
        "ckpt.checkpoint_every=5",
        "ckpt.oss_snapshot_freq=2",
        "ckpt.max_to_keep=1",
    )
    Trainer(load(*overrides, f"run_folder='{tmp_path}/run'")).fit()
    # Regular checkpoints at 5, 10 and the last step, the newest one kept; snapshots at the other even steps, the
    # newest two kept, in their own folder.
    assert [s for s, _ in step_dirs(ck)] == [12]
    assert [s for s, _ in step_dirs(ck / "snapshot")] == [8, 6]
    shutil.rmtree(ck / "12")  # as if the run died after the snapshot at 8

    # auto_resume takes the newest checkpoint, a snapshot here, and says that load_ckpt_info is not used.
    info = f"ckpt.load_ckpt_info=dict(path='{golden['ckpt']}', content=('model',))"
    summary = Trainer(load(*overrides, info, f"run_folder='{tmp_path}/again'")).fit()
    assert summary["start_step"] == 8
    assert (
        f"auto_resume: restored {ck}/snapshot step 8 (batch_count=8, step_count=8); "
        f"ckpt.load_ckpt_info ({golden['ckpt']}) not used" in joined(logs)
    )
    same_losses(read_metrics(tmp_path / "again"), golden["rows"], range(8, STEPS))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """An uninterrupted 4-step data 8 run: its metrics and its checkpoints after batches 3 and 4."""
    root = tmp_path_factory.mktemp("four")
    Trainer(
        load(
            "data.total_steps=4",
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='local:{root / 'ckpt'}'",
            "ckpt.checkpoint_every=3",
            f"run_folder='{root}/run'",
        )
    ).fit()
    return dict(ckpt=root / "ckpt", rows=read_metrics(root / "run"))


# data x fsdp is 4 in both layouts, so micro_num 4 keeps data 8's global batch: InternEvo's sampler hands rank r the
# packs order[r::dp], so step s reads packs order[16s:16s + 16] either way (dp 4 with micro_num 2 would read others).
OTHER_MESHES = {
    "fsdp 4 x tensor 2": ("parallel.zero1=dict(size=-1, fsdp=True)", "parallel.tensor.size=2"),
    "pipeline 2": ("parallel.pipeline.size=2",),
}


@pytest.mark.parametrize("layout", OTHER_MESHES)
def test_auto_resume_onto_another_mesh_takes_the_same_next_step(four_steps, tmp_path, logs, layout):
    src, ck = four_steps["ckpt"], tmp_path / "ckpt"
    shutil.copytree(src, ck, ignore=lambda folder, _: ["4"] if Path(folder) == src else [])  # resume from 3
    trainer = Trainer(
        load(
            "data.total_steps=4",
            "data.micro_num=4",
            *OTHER_MESHES[layout],
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='local:{ck}'",
            "ckpt.checkpoint_every=3",
            f"run_folder='{tmp_path}/run'",
        )
    )
    assert trainer.dp == 4 and trainer.mesh.shape["tensor" if "tensor" in layout else "pipeline"] == 2
    assert trainer.fit()["start_step"] == 3
    assert f"auto_resume: restored {ck} step 3 (batch_count=3, step_count=3)" in joined(logs)
    got, want = read_metrics(tmp_path / "run"), four_steps["rows"]
    assert sorted(got) == [3]
    for key in ("loss", "grad_norm"):
        assert got[3][key] == pytest.approx(want[3][key], rel=1e-5), key


def test_stop_file_saves_and_stops(tmp_path, logs):
    stop, ck = tmp_path / "ctl" / "stop", tmp_path / "ckpt"
    stop.parent.mkdir()
    stop.write_text("3")  # left from an earlier run: reset to 0 at start, as InternEvo does
    trainer = Trainer(
        load(
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='{ck}'",
            "ckpt.checkpoint_every=100",
            f"ckpt.stop_file_path='local:{stop}'",
            f"run_folder='{tmp_path}/run'",
        )
    )
    assert stop.read_text() == "0"
    stop.write_text("-2\n")  # save at batch 2 and go on
    point = trainer._checkpoint_point

    def then_ask_to_stop(done, *args):
        out = point(done, *args)
        if done == 2:
            stop.write_text("5")  # save at batch 5 and exit
        return out

    trainer._checkpoint_point = then_ask_to_stop
    summary = trainer.fit()
    assert summary["steps"] == 5 and not summary["preempted"]
    assert [s for s, _ in step_dirs(ck)] == [5, 2]
    assert sorted(read_metrics(tmp_path / "run")) == [0, 1, 2, 3, 4]
    text = joined(logs)
    assert f"stop file {stop} holds -2: saved step 2\n" in text + "\n"
    assert f"stop file {stop} holds 5: saved step 5; exiting cleanly" in text


# ---------------------------------------------------------------------------------------------------------------------
def test_kill_9_during_an_async_save_resumes_bit_exact(golden, tmp_path):
    ckpt = tmp_path / "ckpt"

    def command(run):
        return [
            sys.executable,
            str(ROOT / "launch.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            "--launcher=local",
            f"--config.data.total_steps={STEPS}",
            "--config.ckpt.enable_save_ckpt=True",
            f"--config.ckpt.save_ckpt_folder=local:{ckpt}",
            "--config.ckpt.checkpoint_every=1",
            f"--config.run_folder={tmp_path / run}",
        ]

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command("first"), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    caught = None
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        names = [p.name for p in ckpt.iterdir()] if ckpt.exists() else []
        tmp = [n for n in names if n.endswith(".orbax-checkpoint-tmp")]
        if tmp and any(n.isdigit() for n in names):  # a save is being written, and an earlier one is complete
            os.kill(proc.pid, signal.SIGKILL)
            caught = tmp[0]
            break
        time.sleep(0.001)
    proc.wait(timeout=60)
    log.close()
    assert caught is not None, "never saw a save in progress:\n" + (tmp_path / "first.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    complete = [s for s, _ in step_dirs(ckpt)]
    killed_at = int(caught.split(".")[0])
    assert complete and complete[0] <= killed_at, (complete, caught)  # the save may have committed meanwhile

    # Killed after orbax's commit but before the manifest: that step is passed over for the verified one before.
    verified = [s for s in complete if (ckpt / str(s) / "manifest.json").is_file()]
    out = subprocess.run(command("second"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"auto_resume: restored {ckpt} step {verified[0]} " in out.stdout + out.stderr
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name]  # the killed save's folder is gone

    first, second = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "second")
    assert sorted(second) == list(range(verified[0], STEPS))
    assert set(first) | set(second) == set(range(STEPS))
    same_losses(first, golden["rows"], first)
    same_losses(second, golden["rows"], second)


# ---------------------------------------------------------------------------------------------------------------------
def saving(ckpt):
    return "ckpt.enable_save_ckpt=True", f"ckpt.save_ckpt_folder='{ckpt}'", "ckpt.checkpoint_every=3"


def test_a_finished_run_compiles_and_writes_nothing(golden, tmp_path, monkeypatch, logs):
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(golden["ckpt"], ckpt)
    no_compile(monkeypatch)
    trainer = Trainer(load(*saving(ckpt), f"run_folder='{run}'"))
    summary = trainer.fit()
    assert summary["finished"] and summary["steps"] == 0 and summary["start_step"] == STEPS
    assert not run.exists() and not (ckpt / ".lock").exists()
    assert f"nothing to train: the newest checkpoint is at batch {STEPS}" in joined(logs)


def test_a_refused_run_writes_nothing_into_the_live_runs_folder(tmp_path, monkeypatch):
    """The writer lock comes before config.json and before compiling: a second run pointed at a live run's folders
    is refused at once and leaves the live run's config.json alone."""
    from internevo_jax.checkpoint.manager import Checkpointer

    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    cfg = load(*saving(ckpt), f"run_folder='{run}'")
    live = Checkpointer(cfg.ckpt, job_name="live")
    run.mkdir()
    (run / "config.json").write_text("the live run's")
    no_compile(monkeypatch)
    try:
        with pytest.raises(CheckpointError):
            Trainer(cfg)
    finally:
        live.close()
    assert (run / "config.json").read_text() == "the live run's"


def test_a_resume_moves_the_dropped_branchs_metrics_aside(golden, tmp_path, logs):
    """The earlier attempt logged batches 0..10 and a validation at 6, then died with checkpoint 6 its newest: the
    resumed run's metrics.jsonl holds each batch once, from the one history; the dropped rows (7..10 and 6's train
    row, and a line cut short) are in metrics.superseded.jsonl."""
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(golden["ckpt"], ckpt)
    for step in ("9", "12"):
        shutil.rmtree(ckpt / step)
    run.mkdir()
    earlier = [json.dumps(golden["rows"][s]) for s in range(11)]
    earlier.insert(7, json.dumps({"step": 6, "step_count": 6, "val/val_loss": 5.0}))
    (run / "metrics.jsonl").write_text("\n".join(earlier) + '\n{"step": 11, "lo')
    Trainer(load(*saving(ckpt), f"run_folder='{run}'")).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(STEPS))
    assert [r["step"] for r in rows if "val/val_loss" in r] == [6]
    same_losses({r["step"]: r for r in rows if "loss" in r}, golden["rows"], range(STEPS))
    aside = (run / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:-1]] == [6, 7, 8, 9, 10] and aside[-1] == '{"step": 11, "lo'
    assert "metrics.jsonl: moved 6 rows of batches >= 6" in joined(logs)


# ---------------------------------------------------------------------------------------------------------------------
# A resume under changed data settings (issue 18).


def test_a_resume_under_changed_data_keys_is_refused_before_compiling(golden, tmp_path, monkeypatch):
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(golden["ckpt"], ckpt)
    no_compile(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        Trainer(load(*saving(ckpt), f"run_folder='{run}'", "data.micro_bsz=4", "data.seed=7", "data.total_steps=20"))
    msg = str(e.value)
    assert (
        f"ckpt.auto_resume: {ckpt}/12 was saved with other data settings: data.micro_bsz 2 -> 4, data.seed 1024 -> 7."
        in msg
    )
    assert "repeat or skip samples" in msg and "total_steps" not in msg  # a longer run is the same stream
    assert "--config.ckpt.auto_resume=False to start over" in msg and "--config.ckpt.accept_data_change=True" in msg
    assert not run.exists() and not (ckpt / ".lock").exists()
    # micro_num and the rampup count per data-parallel rank: compared as packs per step (the mesh test keeps them).
    with pytest.raises(CheckpointError) as e:
        Trainer(load(*saving(ckpt), f"run_folder='{run}'", "data.micro_num=4", "data.rampup_batch_size='2 1 2'"))
    msg = str(e.value)
    assert "data.micro_num x data-parallel size 2 x 8 = 16 -> 4 x 8 = 32 packs per step" in msg
    assert "data.rampup_batch_size '' -> '2 1 2'" in msg
    # Accepted knowingly: a warning, and the run goes on (to compiling, which no_compile stops here).
    with pytest.raises(AssertionError, match="compiled the train step"):
        Trainer(
            load(
                *saving(ckpt),
                f"run_folder='{run}'",
                "data.micro_bsz=4",
                "data.total_steps=20",
                "ckpt.accept_data_change=True",
            )
        )
    # Unchanged data keys, a longer run: resumes.
    with pytest.raises(AssertionError, match="compiled the train step"):
        Trainer(load(*saving(ckpt), f"run_folder='{run}2'", "data.total_steps=20"))


def test_loading_another_runs_sampler_under_changed_data_keys_is_refused(golden, tmp_path, monkeypatch):
    no_compile(monkeypatch)
    info = f"ckpt.load_ckpt_info=dict(path='{golden['ckpt']}/6', content=('model', 'sampler'))"
    with pytest.raises(
        CheckpointError,
        match=r"ckpt.load_ckpt_info: .*/6 was saved with other data settings: "
        r"data.seq_len 32 -> 16.*drop 'sampler' from its content",
    ):
        Trainer(load(info, "data.seq_len=16", f"run_folder='{tmp_path}/run'"))
    with pytest.raises(AssertionError, match="compiled the train step"):  # the weights alone: no data position
        Trainer(load(info.replace(", 'sampler'", ""), "data.seq_len=16", f"run_folder='{tmp_path}/run'"))
