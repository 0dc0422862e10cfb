"""Schedules against hand-computed InternEvo formulas (docs/internevo_parity.md#lr-and-beta2-schedules), the loss
scaler (O-04), clipping (O-07)."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from internevo_jax.optim import (
    beta2_schedule,
    clip_by_global_norm,
    init_loss_scale,
    lr_schedule,
    update_loss_scale,
)


def sched(total=1000, warmup_ratio=0.01, init_steps=0, eta_min=1e-5, lr=1e-4):
    adam = ml_collections.ConfigDict(dict(lr=lr))
    lr_cfg = ml_collections.ConfigDict(
        dict(total_steps=total, warmup_ratio=warmup_ratio, init_steps=init_steps, eta_min=eta_min)
    )
    return lr_schedule(adam, lr_cfg)


def test_lr_matches_internevo_doc_log():
    # usage.md: total 50000, warmup 0.01 -> 500 warmup steps; step 0 logs lr(1) = 1e-4 * 2 / 500 = 4e-7.
    lr = sched(total=50000)
    assert float(lr(1)) == pytest.approx(4e-7, rel=1e-6)
    assert float(lr(2)) == pytest.approx(6e-7, rel=1e-6)
    assert float(lr(5)) == pytest.approx(1.2e-6, rel=1e-6)


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 1e-4 * 1 / 10),  # warmup start
        (9, 1e-4),  # warmup end: (9 + 1) / 10
        (10, 1e-4),  # cosine start
        (10 + 45, 1e-5 + (1e-4 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)) / 2),  # mid-cosine
        (99, 1e-5 + (1e-4 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)) / 2),  # last step
        (100, 1e-5),
    ],
)
def test_lr_warmup_cosine(k, expected):
    assert float(sched(total=100, warmup_ratio=0.1)(k)) == pytest.approx(expected, rel=1e-5)


def test_lr_init_steps():
    lr = sched(total=100, warmup_ratio=0.1, init_steps=5)
    assert float(lr(4)) == 0.0
    assert float(lr(5)) == pytest.approx(1e-5, rel=1e-5)  # (5 + 1 - 5) / 10
    assert float(lr(14)) == pytest.approx(1e-4, rel=1e-5)
    # No warmup after init steps: InternEvo's recursion starts from lr 0 and stays near eta_min.
    lr = sched(total=100, warmup_ratio=0.0, init_steps=5)
    assert float(lr(5)) == pytest.approx(0.0, abs=1e-12)
    assert float(lr(100)) == pytest.approx(1e-5, rel=1e-5)


def test_beta2_schedule():
    b2 = beta2_schedule(ml_collections.ConfigDict(dict(init_beta2=0.95, c=0.8)))
    assert float(b2(0)) == pytest.approx(0.95)
    assert float(b2(100)) == pytest.approx(max(0.95, 1 - 100**-0.8), rel=1e-6)
    assert float(b2(10000)) == pytest.approx(1 - 10000**-0.8, rel=1e-6)
    const = beta2_schedule(ml_collections.ConfigDict(dict(init_beta2=0.95, c=0)))
    assert float(const(1234)) == pytest.approx(0.95)


def scaler_cfg(**kw):
    base = dict(
        fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=3),
        growth_factor=2.0,
        backoff_factor=0.5,
        max_scale=2**17,
        hysteresis=2,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_loss_scale_hysteresis_backoff_growth():
    gs = scaler_cfg()
    ls = init_loss_scale(gs, "float16")
    seen = []
    for finite in [False, False, False, True, True, True, True, True, True, True, True, True]:
        ls = update_loss_scale(ls, jnp.bool_(finite), gs, "float16")
        seen.append(float(ls.scale))
    # 1st overflow: hysteresis 1 < 2, keep. 2nd: back off. 3rd: hysteresis count not reset -> back off again.
    # Then growth every 3 good steps, capped at max_scale 2^17.
    assert seen == [2**16, 2**15, 2**14, 2**14, 2**14, 2**15, 2**15, 2**15, 2**16, 2**16, 2**16, 2**17]
    assert int(ls.hysteresis_step) == 0  # reset by growth


def test_loss_scale_fixed_for_fp32():
    gs = scaler_cfg()
    ls = init_loss_scale(gs, "float32")
    assert float(update_loss_scale(ls, jnp.bool_(False), gs, "float32").scale) == 1.0


def test_clip_matches_internevo():
    grads = {"a": jnp.full((4,), 3.0)}
    norm = jnp.float32(6.0)
    out = clip_by_global_norm(grads, norm, 1.0)
    np.testing.assert_allclose(out["a"], 3.0 / ((6.0 + 1e-6) / 1.0), rtol=1e-6)
    assert clip_by_global_norm(grads, norm, 10.0)["a"][0] == 3.0
    assert clip_by_global_norm(grads, norm, 0.0)["a"][0] == 3.0
