"""tools/gpu_check.py, the one-call GPU check, as a CPU dry run: every stage runs at tiny shapes (Pallas interpreted),
so the script a lent GPU gets minutes for cannot rot; a stage past its deadline leaves the others' results."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

STAGES = ("env", "correct", "attention", "train", "peer")


def _gpu_check(out, *args, timeout=900):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU host (one H200)
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(out), "--dry-run", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check(out)
    assert r.returncode == 0, r.stdout[-3000:] + (out / "gpu_check.log").read_text()[-6000:]
    # What comes back from the device tool: at most 8 plain files, no deeper folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{s}.json" for s in STAGES] + ["summary.md", "gpu_check.log"]), files
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok |" in summary
    correct = json.loads((out / "correct.json").read_text())["rows"]
    kernels = [r for r in correct if r["check"] == "kernel"]
    # Causal and packed rows, bf16 and fp32, all four arrays checked against the oracle.
    assert {(r["case"], r["dtype"]) for r in kernels} == {
        (c, d) for c in ("causal", "packed") for d in ("bfloat16", "float32")
    }
    assert all(r["passed"] and len(r["errors"]) == 4 for r in kernels)
    train = {r["impl"]: r["losses"] for r in correct if r["check"] == "train"}
    assert set(train) == {"xla", "pallas"} and all(len(v) == 3 for v in train.values())
    assert train["xla"] != train["pallas"]  # the interpreted kernel really ran (equal to rounding, not identical)
    variants = json.loads((out / "train.json").read_text())["rows"]
    assert [v["variant"] for v in variants] == ["preset (auto attention)", "no remat", "micro_bsz 4 x micro_num 1"]
    assert all(v["tokens_per_second_per_device"] > 0 for v in variants)
    env = json.loads((out / "env.json").read_text())["rows"][0]
    assert env["versions"]["jax"] and env["matmul_bf16"]["tflops"] > 0


def test_a_stage_past_its_deadline_is_cut_and_the_rest_reported(tmp_path):
    out = tmp_path / "out"
    # Two seconds cannot hold a fresh process that imports jax and compiles the train step (a fresh cache).
    r = _gpu_check(out, "--stages", "env,train", "--deadline", "train=2", "--cache", str(tmp_path / "c"), timeout=300)
    assert r.returncode == 1
    summary = (out / "summary.md").read_text()
    assert "| env | ok |" in summary
    assert "| train | cut at its 2 s deadline (partial results kept) |" in summary
    assert json.loads((out / "env.json").read_text())["rows"]  # the finished stage's results stay


def test_a_spent_budget_runs_no_stage(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check(out, "--stages", "env,train", "--budget", "4", timeout=60)
    assert r.returncode == 1
    summary = (out / "summary.md").read_text()
    assert "| env | not run: budget spent |" in summary and "| train | not run: budget spent |" in summary


def test_optional_moe_stage_compares_dense_and_moe(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check(out, "--stages", "moe", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + (out / "gpu_check.log").read_text()[-6000:]
    rows = json.loads((out / "moe.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == [
        "dense, FFN 4 x hidden",
        "MoE 8 x (2 x hidden), top-2, capacity",
        "MoE 8 x (2 x hidden), top-2, dropless",
    ]
    assert all(row["tokens_per_second_per_device"] > 0 for row in rows)
    assert rows[1]["num_params"] > rows[0]["num_params"]  # the experts really were built


def test_unknown_stage_is_refused(tmp_path):
    r = _gpu_check(tmp_path, "--stages", "env,speed", timeout=60)
    assert r.returncode == 2 and "unknown ['speed']" in r.stderr
    r = _gpu_check(tmp_path, "--deadline", "speed=3", timeout=60)
    assert r.returncode == 2 and "--deadline" in r.stderr
