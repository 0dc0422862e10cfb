"""The mixture-of-experts layer (moe.py) against a NumPy reference of InternEvo's GShard formulas written out here
(M-17: ``internlm/model/moe/gshard_layer.py`` top1gating/top2gating, read as formulas, not run), one token at a time
with Python loops, so the reference shares no code or vectorisation trick with the layer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.moe import MoE, capacity, gate


def moe_config(**moe_keys):
    model = dict(
        num_experts=moe_keys.pop("num_experts", 4),
        moe_type=moe_keys.pop("moe_type", "GShard"),
        moe_use_residual=moe_keys.pop("moe_use_residual", False),
        vocab_size=64,
        hidden_size=16,
        num_layers=2,
        num_attention_heads=2,
        mlp_ratio=1,
        multiple_of=8,
        dtype="torch.float32",
    )
    return config_lib.build(
        dict(
            model_type="INTERNLM_MoE",
            model=model,
            moe=moe_keys,
            data=dict(seq_len=16, micro_bsz=1, type="dummy"),
            ckpt=dict(enable_save_ckpt=False),
        )
    )


def normal_init(key, shape, std, kind):
    return 0.5 * jax.random.normal(key, shape, jnp.float32)  # large weights: uneven routing, so experts overflow


def make_layer(**moe_keys):
    cfg = moe_config(**moe_keys)
    return MoE(cfg.model, nnx.Rngs(0), (), jnp.float32(1.0), normal_init)


# ---------------------------------------------------------------------------------------------------------------------
# The reference (NumPy, float64, loops).


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def swiglu(x, w1, w3, w2):
    a = x @ w1
    return ((a / (1 + np.exp(-a))) * (x @ w3)) @ w2


def reference_row(x, wg, w1, w3, w2, top_k, cap, noise=None, rts=None):
    """One row (group) of S tokens: (y [S, D], aux loss, number of dropped choices).

    ``noise``: the Gumbel draw [S, E] for the second expert (top-2, training) or RSample's (top-1); ``rts``: the
    uniform draw [S, E] of random token selection (top-1, training); None: evaluation (first come, first served).
    """
    s_len, e = x.shape[0], wg.shape[1]
    logits = x @ wg
    gates = np.stack([softmax(logits[s]) for s in range(s_len)])
    if top_k == 1 and noise is not None:
        first = [int(np.argmax(logits[s] + noise[s])) for s in range(s_len)]
    else:
        first = [int(np.argmax(gates[s])) for s in range(s_len)]
    me = gates.mean(axis=0)
    ce = np.array([sum(f == j for f in first) / s_len for j in range(e)])
    aux = e * float(np.sum(me * ce)) if top_k == 1 else e * e * float(np.mean(me * ce))
    y = np.zeros_like(x)
    dropped = 0
    if top_k == 1:
        for j in range(e):
            mine = [s for s in range(s_len) if first[s] == j]
            if rts is not None:
                mine = sorted(mine, key=lambda s: -rts[s, j])
            keep = set(mine[:cap])
            dropped += len(mine) - len(keep)
            for s in keep:
                y[s] += gates[s, j] * swiglu(x[s], w1[j], w3[j], w2[j])
        return y, aux, dropped
    second = []
    for s in range(s_len):
        z = logits[s] + (0 if noise is None else noise[s])
        z[first[s]] = -np.inf
        second.append(int(np.argmax(z)))
    count1 = [sum(f == j for f in first) for j in range(e)]
    seen1, seen2 = [0] * e, [0] * e
    for s in range(s_len):
        a, b = first[s], second[s]
        loc1, loc2 = seen1[a], count1[b] + seen2[b]  # second choices queue behind every first choice
        seen1[a] += 1
        seen2[b] += 1
        g1 = gates[s, a] if loc1 < cap else 0.0
        g2 = gates[s, b] if loc2 < cap else 0.0
        dropped += (loc1 >= cap) + (loc2 >= cap)
        denom = max(g1 + g2, np.finfo(np.float32).eps)
        if g1:
            y[s] += g1 / denom * swiglu(x[s], w1[a], w3[a], w2[a])
        if g2:
            y[s] += g2 / denom * swiglu(x[s], w1[b], w3[b], w2[b])
    return y, aux, dropped


def weights_of(layer):
    return [np.asarray(w[...], np.float64) for w in (layer.wg, layer.w1, layer.w3, layer.w2)]


def inputs(b=2, t=16, d=16, seed=3):
    return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


def check_against_reference(layer, x, top_k, cap, noise=None, rts=None):
    y, aux = layer(x)
    rows = [reference_row(np.asarray(x[i], np.float64), *weights_of(layer), top_k, cap, noise, rts) for i in range(2)]
    np.testing.assert_allclose(np.asarray(y), np.stack([r[0] for r in rows]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux), np.mean([r[1] for r in rows]), rtol=1e-5)
    return sum(r[2] for r in rows)


# ---------------------------------------------------------------------------------------------------------------------


def test_capacity_is_internevos_formula():
    assert capacity(16, 4, 1.0, 4, 1) == 4  # ceil(16 / 4 * 1)
    assert capacity(16, 4, 1.0, 4, 2) == 8  # x2 for top-2
    assert capacity(16, 4, 0.1, 4, 1) == 4  # min_capacity
    assert capacity(10, 4, 1.0, 0, 1) == 3  # ceil(2.5)
    assert capacity(16, 4, 9.0, 4, 2) == 16  # never more slots than tokens


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("factor, min_capacity, drops", [(0.5, 0, True), (None, 4, False)])
def test_eval_forward_and_aux_loss_match_the_reference(top_k, factor, min_capacity, drops):
    """``eval_capacity_factor`` sets the capacity in evaluation; drop_tokens=False (factor None here) never drops."""
    keys = dict(top_k=top_k, min_capacity=min_capacity, use_rts=False)
    keys.update(dict(eval_capacity_factor=factor) if factor else dict(drop_tokens=False))
    layer = make_layer(**keys)
    cap = capacity(16, 4, factor, min_capacity, top_k) if factor else 16
    dropped = check_against_reference(layer, inputs(), top_k, cap)
    assert (dropped > 0) == drops  # the case that drops does drop, the other drops nothing


@pytest.mark.parametrize("top_k", [1, 2])
def test_training_noise_matches_the_reference_given_the_same_draws(top_k):
    """Training: top-2's second expert by Gumbel-max, top-1's random token selection (which of an over-full expert's
    tokens stay: the largest uniform draws) and RSample (top-1's arg-max of logits + Gumbel). The draws are the
    layer's (the key schedule: per row, split(key) -> (noise, rts)); what is done with them is the reference's."""
    policy = "RSample" if top_k == 1 else None
    layer = make_layer(top_k=top_k, capacity_factor=0.5, min_capacity=0, use_rts=True, noisy_gate_policy=policy)
    x, key = inputs(), jax.random.key(7)
    y, aux = layer(x, key)
    _, k_gate = jax.random.split(key)
    row_keys = jax.random.split(k_gate, 2)
    cap = capacity(16, 4, 0.5, 0, top_k)
    total_dropped = 0
    for i in range(2):
        k_noise, k_rts = jax.random.split(row_keys[i])
        noise = np.asarray(jax.random.gumbel(k_noise, (16, 4)), np.float64)
        rts = np.asarray(jax.random.uniform(k_rts, (16, 4)), np.float64) if top_k == 1 else None
        ref, _, dropped = reference_row(np.asarray(x[i], np.float64), *weights_of(layer), top_k, cap, noise, rts)
        np.testing.assert_allclose(np.asarray(y[i]), ref, rtol=1e-5, atol=1e-6)
        total_dropped += dropped
    assert total_dropped > 0


def test_renormalised_top2_weights_sum_to_one_when_both_kept():
    logits = jax.random.normal(jax.random.key(0), (16, 4))
    r = gate(logits, 2, 16, None)
    both = np.asarray(r.kept.all(-1))
    assert both.all()
    np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), 1.0, rtol=1e-6)


def test_jitter_perturbs_only_the_gate_input_in_training():
    layer = make_layer(noisy_gate_policy="Jitter", drop_tokens=False)
    x = inputs()
    plain, _ = make_layer(drop_tokens=False)(x)
    np.testing.assert_allclose(np.asarray(layer(x)[0]), np.asarray(plain), rtol=1e-6)  # evaluation: no jitter
    _, aux_noisy = layer(x, jax.random.key(1))
    _, aux_plain = layer(x, None)
    assert float(aux_noisy) != float(aux_plain)


def test_residual_moe_mixes_the_dense_mlp_by_a_softmax_coefficient():
    layer = make_layer(moe_use_residual=True, drop_tokens=False)
    x = inputs()
    y, _ = layer(x)
    moe_only, _, _ = reference_row(np.asarray(x[0], np.float64), *weights_of(layer), 1, 16)
    x0 = np.asarray(x[0], np.float64)
    dense = swiglu(x0, *(np.asarray(w[...], np.float64) for w in (layer.res_w1, layer.res_w3, layer.res_w2)))
    c = x0 @ np.asarray(layer.coefficient[...], np.float64) + np.asarray(layer.coefficient_bias[...], np.float64)
    c = np.exp(c) / np.exp(c).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y[0]), moe_only * c[:, :1] + dense * c[:, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_dropless_ragged_dot_is_the_capacity_path_when_that_drops_nothing(top_k, training):
    """moe_type MegaBlock-D (grouped GEMMs) and GShard with drop_tokens=False: same function, same gradients, in
    evaluation and in training (same routing noise)."""
    capacity_layer = make_layer(top_k=top_k, drop_tokens=False)
    dropless_layer = make_layer(top_k=top_k, moe_type="MegaBlock-D")
    key = jax.random.key(5) if training else None
    x = inputs()

    def run(layer, x):
        y, aux = layer(x, key)
        return jnp.sum(y * jnp.cos(y)) + aux, y

    (l1, y1), g1 = jax.value_and_grad(lambda lay, x: run(lay, x), argnums=(0, 1), has_aux=True)(capacity_layer, x)
    (l2, y2), g2 = jax.value_and_grad(lambda lay, x: run(lay, x), argnums=(0, 1), has_aux=True)(dropless_layer, x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        # fp32 sums in another order: elementwise to 1e-5 of the tensor's largest entry
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_moe_loss_is_coeff_times_the_layers_aux_losses_added_to_the_trained_loss():
    """LS-04: the differentiated loss is CE + moe_loss_coeff x sum over layers of l_aux; the reported loss is CE."""
    from internevo_jax.model import build_model
    from internevo_jax.step import make_loss_fn

    cfg = moe_config(top_k=2)
    with cfg.unlocked():
        cfg.loss.moe_loss_coeff = 0.25
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    t = jnp.arange(16)[None] % 64
    mb = dict(tokens=t, positions=jnp.arange(16)[None], segment_ids=jnp.ones((1, 16), jnp.int32), labels=t)
    mb["type_ids"] = jnp.zeros((1, 16), jnp.int32)
    total, (loss, _, moe_loss) = make_loss_fn(cfg, graphdef, 1)(params, mb, jnp.float32(1.0), None)
    _, aux = model.features_and_moe_loss(mb["tokens"], mb["positions"], mb["segment_ids"])
    assert math.isclose(float(moe_loss), 0.25 * float(aux), rel_tol=1e-6) and float(aux) > 1.0  # 2 layers, ~1 each
    assert math.isclose(float(total), float(loss) + float(moe_loss), rel_tol=1e-6)
