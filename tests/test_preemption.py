"""Stopping early: SIGTERM -> every process agrees on a step, saves it, exits 0, and the next start resumes from it
(E6a); without checkpoints SIGTERM still stops (143); Ctrl-C saves at the next step and exits 130, a second one
stops at once; an error while a checkpoint is being written finishes or abandons that save on purpose."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT


def test_sigterm_saves_and_resume_continues(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    args = [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.data.total_steps=100000",
        "--config.lr_scheduler.total_steps=1000",
        "--config.ckpt.enable_save_ckpt=True",
        f"--config.ckpt.save_ckpt_folder=local:{ckpt}",
        "--config.ckpt.checkpoint_every=1000000",
        f"--config.run_folder={run}",
    ]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preemption: saved step" in out, out
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 100000

    # Resume: the run continues at the saved batch with the same counters.
    args[3] = f"--config.data.total_steps={saved[0] + 2}"
    out = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"auto_resume: restored {ckpt} step {saved[0]}" in out.stdout
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows[-2:]] == [saved[0], saved[0] + 1]
    assert rows[-1]["num_consumed_tokens"] == (saved[0] + 2) * 2 * 64


def launch_args(tmp_path, *overrides):
    return [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.data.total_steps=100000",
        "--config.lr_scheduler.total_steps=1000",
        f"--config.run_folder={tmp_path / 'run'}",
        *overrides,
    ]


def signal_after_rows(args, tmp_path, signum, rows=3):
    """Starts launch.py, sends ``signum`` once ``rows`` steps are logged; returns (exit code, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < rows):
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out, time.time() - sent


def test_ctrl_c_saves_at_the_next_step_and_exits_130(tmp_path):
    ckpt, alerts = tmp_path / "ckpt", tmp_path / "alerts.txt"
    code, out, _ = signal_after_rows(
        launch_args(
            tmp_path,
            "--config.ckpt.enable_save_ckpt=True",
            f"--config.ckpt.save_ckpt_folder=local:{ckpt}",
            "--config.ckpt.checkpoint_every=1000000",
            f"--config.monitor.alert.alert_file_path={alerts}",
        ),
        tmp_path,
        signal.SIGINT,
    )
    assert code == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert len(saved) == 1 and not [p for p in ckpt.iterdir() if "tmp" in p.name], list(ckpt.iterdir())
    assert f"interrupted at step {saved[0]}; saved" in out, out
    assert f"stopped early (interrupted) at batch {saved[0]} of 100000" in out and " done: " not in out, out
    titles = [line.split("\t")[1] for line in alerts.read_text().splitlines()]
    assert titles[-1] == "stopped (interrupted)" and "finished" not in titles, titles


def test_sigterm_without_checkpoints_stops_at_the_next_step(tmp_path):
    """configs/tiny.py saves no checkpoints: SIGTERM still stops the run (exit 143, nothing saved), promptly."""
    code, out, seconds = signal_after_rows(launch_args(tmp_path), tmp_path, signal.SIGTERM)
    assert code == 143, out
    assert "preemption (SIGTERM): stopped at step" in out and "nothing saved" in out, out
    assert "stopped early (preempted)" in out and seconds < 60, (seconds, out)


def test_ctrl_c_in_process_stops_after_the_step_in_flight(tiny_config, tmp_path, logs):
    """Without a JAX cluster (a notebook, a script driving the Trainer) Ctrl-C is a flag read at the next step: the
    run saves there and fit() returns a summary that says it stopped; a second Ctrl-C raises at once."""
    from internevo_jax import Trainer
    from internevo_jax.interrupts import Interrupts

    ckpt = tmp_path / "ckpt"
    trainer = Trainer(
        tiny_config(
            "data.total_steps=50",
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='{ckpt}'",
            "ckpt.checkpoint_every=100",
            f"run_folder='{tmp_path}/run'",
        )
    )
    batches = trainer.batches

    def ctrl_c_at_batch_3(meta):
        it = batches(meta)

        class Items:
            def __next__(self):
                item = next(it)
                if item["step"] == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                return item

            def get_state(self):
                return it.get_state()

        return Items()

    trainer.batches = ctrl_c_at_batch_3
    summary = trainer.fit()
    assert summary["stopped"] == "interrupted" and summary["saved"] and not summary["finished"], summary
    assert summary["end_step"] == 4 and summary["steps"] == 4
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) == ["4"]
    text = "\n".join(r.getMessage() for r in logs)
    assert "interrupted at step 4; saved" in text
    # The init function's compile is a phase of its own in the log (it was ~30 s of silence on a big model).
    assert text.index("initialising the train state from seed 1024") < text.index("starting from scratch (seed 1024")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after fit()

    with Interrupts(saves=False) as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.count == 1 and interrupts.stop_reason(1) == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


@pytest.mark.parametrize("how", ["finished", "abandoned"])
def test_an_error_finishes_or_abandons_the_save_in_flight(tiny_config, tmp_path, monkeypatch, logs, how):
    """A data error while a checkpoint is being written: fit() waits for it (manifest written, lock freed) before
    the error propagates, or past pending_save_timeout abandons it and says so, instead of leaving it to die with
    the interpreter."""
    from internevo_jax import Trainer
    from internevo_jax.checkpoint import manager

    ckpt = tmp_path / "ckpt"
    write_manifest = manager.write_manifest

    def slow_manifest(*args):
        time.sleep(3)
        write_manifest(*args)

    monkeypatch.setattr(manager, "write_manifest", slow_manifest)
    trainer = Trainer(
        tiny_config(
            "data.total_steps=10",
            "ckpt.enable_save_ckpt=True",
            f"ckpt.save_ckpt_folder='{ckpt}'",
            "ckpt.checkpoint_every=2",
            f"run_folder='{tmp_path}/run'",
        )
    )
    if how == "abandoned":
        trainer.pending_save_timeout = 0.5
    batches = trainer.batches

    def failing(meta):
        it = batches(meta)

        class Items:
            def __next__(self):
                item = next(it)
                if item["step"] == 3:
                    raise RuntimeError("bad shard")
                return item

            def get_state(self):
                return it.get_state()

        return Items()

    trainer.batches = failing
    t0 = time.time()
    with pytest.raises(RuntimeError, match="bad shard"):
        trainer.fit()
    text = "\n".join(r.getMessage() for r in logs)
    if how == "finished":
        assert (ckpt / "2" / "manifest.json").is_file() and not (ckpt / ".lock").exists()
        assert "abandoned" not in text
    else:
        assert time.time() - t0 < 2.5 and not (ckpt / "2" / "manifest.json").exists()
        assert "abandoned the checkpoint being written (still writing after 0.5 s)" in text
