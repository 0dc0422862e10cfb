"""End-to-end training on 8 fake CPU devices: the loss falls, the step never retraces, resume is bit-exact."""

import json
import shutil

import jax
import numpy as np
import pytest

from internevo_jax import Trainer


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_learns(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.total_steps=22",
        "data.skip_batches='5-6'",
        "data.rampup_batch_size='1 1 2'",
        f"run_folder='{tmp_path}/run'",
    )
    trainer = Trainer(cfg)
    assert trainer.mesh.shape["data"] == 8  # all 8 fake devices are data parallel
    summary = trainer.fit()
    assert summary["steps"] == 20
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [s for s in range(22) if s not in (5, 6)]  # skipped batches: no update
    assert [r["step_count"] for r in rows[4:6]] == [5, 6]  # batch 4, then batch 7: the skips made no update
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    # The rampup '1 1 2' trains batches 0 and 1 on one micro-batch (a second compiled program), then on two.
    assert [r["micro_num"] for r in rows[:3]] == [1, 1, 2] and sorted(trainer._compiled) == [1, 2]
    assert rows[-1]["num_consumed_tokens"] == (2 * 1 + 18 * 2) * 64 * 8
    assert all(r["inf_nan_skip_batches"] == 0 and r["loss_scale"] == 1.0 for r in rows)
    # the logged lr is the next update's lr: step 0 logs lr(1) = 3e-3 * 2 / 2 (warmup of int(22 * 0.1) = 2 steps)
    assert rows[0]["lr"] == pytest.approx(3e-3, rel=1e-6)
    # AccPerplex over all 8 data-parallel rows: dummy data is all type 0 ("en"), so "cn" and "code" stay empty.
    assert rows[-1]["acc"] > rows[0]["acc"] + 0.2 and rows[-1]["perplexity"] < rows[0]["perplexity"]
    for r in rows:
        assert 0 < r["tokens/en"] <= 2 * 64 * 8 and r["tokens/cn"] == r["tokens/code"] == 0
        assert r["loss/cn"] is None and r["acc/cn"] == 0.0
        assert r["acc/en"] == pytest.approx(r["acc"], abs=1e-4)
        assert r["loss/en"] == pytest.approx(r["loss_from_metric"], abs=1e-4)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["total_steps"] == 22


def test_step_is_compiled_once(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("data.total_steps=2", f"run_folder='{tmp_path}/run'"))
    state, _ = trainer.initial_state()
    # An AOT-compiled step rejects other shapes instead of silently retracing.
    bad = {
        k: jax.numpy.zeros((2, 8, 32), jax.numpy.int32)
        for k in ("tokens", "labels", "positions", "segment_ids", "type_ids")
    }
    with pytest.raises((TypeError, ValueError)):
        trainer.train_step(state, bad)


def test_resume_is_bit_exact(tiny_config, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = (
        "data.total_steps=6",
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='local:{ckpt}'",
        "ckpt.checkpoint_every=3",
    )
    Trainer(tiny_config(*common, f"run_folder='{tmp_path}/golden'")).fit()
    golden = read_metrics(tmp_path / "golden")
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "6"]
    shutil.rmtree(ckpt / "6")  # as if the run died after step 5's checkpoint at 3 and before 6

    summary = Trainer(tiny_config(*common, f"run_folder='{tmp_path}/resumed'")).fit()
    assert summary["start_step"] == 3 and summary["steps"] == 3
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for g, r in zip(golden[3:], resumed, strict=True):
        assert float(g["loss"]).hex() == float(r["loss"]).hex(), (g, r)
        assert float(g["grad_norm"]).hex() == float(r["grad_norm"]).hex()
        assert g["num_consumed_tokens"] == r["num_consumed_tokens"] and g["lr"] == r["lr"]


def test_token_outside_vocab_is_rejected(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("model.vocab_size=100", "data.total_steps=1", f"run_folder='{tmp_path}/run'"))
    with pytest.raises(ValueError, match=r"token id \d+ >= model.vocab_size 100"):
        trainer.fit()
