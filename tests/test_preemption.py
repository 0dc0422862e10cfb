"""SIGTERM -> every process agrees on a step, saves it, exits 0; the next start resumes from it (E6a)."""

import json
import os
import signal
import subprocess
import sys
import time

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
