"""The mixture-of-experts layer that takes the MLP's place in a block when ``model.num_experts > 1`` (M-17).

Routing is InternEvo's GShard gating (``internlm/model/moe/gshard_layer.py``), one group per batch row (a row is one
data-parallel rank's micro-batch, so a row's S tokens are what one InternEvo rank gates):

- fp32 logits ``x @ wg`` and an fp32 softmax over the E experts;
- top-1: the arg-max expert (``noisy_gate_policy="RSample"``: of the logits plus Gumbel noise, in training), capacity
  ``max(ceil(S / E * capacity_factor), min_capacity)``; with ``use_rts`` (training) an over-full expert keeps the
  tokens with the largest uniform draw, else the first ones; combine weight = the token's gate probability;
- top-2: the first expert by arg-max, the second by arg-max of the logits plus Gumbel noise among the others (in
  training; evaluation takes the plain second best), capacity with ``2 * capacity_factor``, the second choices queued
  behind all first choices; the two kept weights renormalised to sum 1;
- ``drop_tokens=False``: capacity = S, which no expert can overflow (InternEvo uses the largest expert count, a
  dynamic size; the kept tokens and so the output are the same);
- ``noisy_gate_policy="Jitter"``: the gate's input multiplied by U(0.99, 1.01) in training;
- aux loss: top-1 ``E * sum_e mean_s(gates)_e * mean_s(mask1)_e``, top-2 ``E^2 * mean_e(...)`` (the same number),
  with ``mask1`` the first choices before capacity; averaged over the rows (InternEvo's ranks, then data-parallel
  averaging of the loss);
- ``moe_use_residual``: ``out = moe * softmax(c)_0 + mlp * softmax(c)_1``, ``c = x @ coefficient + bias``.

Experts are stacked weights ``w1``/``w3`` [E, D, F] and ``w2`` [E, F, D] with the logical ``expert`` axis. The
capacity path (``moe_type="GShard"``) scatters the kept tokens into per-expert buffers [B, E, C, D], runs the experts
as one batched matmul and gathers back. The dropless path (``moe_type="MegaBlock-D"``) sorts the (token, choice)
pairs by expert and runs the experts as grouped GEMMs (``jax.lax.ragged_dot``): no capacity, nothing dropped; it
computes the same function as the capacity path whenever that drops nothing.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from internevo_jax.config import ffn_width
from internevo_jax.mesh import constrain


class Routing(NamedTuple):
    """Each token's k choices: ``experts`` [S, k] int, ``weights`` [S, k] fp32 (0 where dropped), ``slots`` [S, k]
    (the position in the expert's buffer; only meaningful where kept), ``kept`` [S, k] bool, and the aux loss."""

    experts: jax.Array
    weights: jax.Array
    slots: jax.Array
    kept: jax.Array
    aux_loss: jax.Array


def capacity(tokens: int, num_experts: int, factor: float, min_capacity: int, top_k: int) -> int:
    """InternEvo's expert capacity: ``max(ceil(tokens / E * factor * top_k), min_capacity)``, at most ``tokens``
    (more slots than tokens are never filled)."""
    return min(max(math.ceil(tokens / num_experts * factor * top_k), min_capacity), tokens)


def gate(
    logits: jax.Array,
    top_k: int,
    cap: int,
    key: jax.Array | None,
    noisy_gate_policy: str | None = None,
    use_rts: bool = True,
) -> Routing:
    """GShard gating of one group: fp32 ``logits`` [S, E] -> ``Routing``. ``key`` None is evaluation (no noise, no
    random token selection); ``cap`` the capacity per expert (``capacity``)."""
    logits = logits.astype(jnp.float32)
    s, e = logits.shape
    gates = jax.nn.softmax(logits, axis=-1)
    k_noise, k_rts = (None, None) if key is None else jax.random.split(key)
    if top_k == 1:
        if noisy_gate_policy == "RSample" and k_noise is not None:  # (k_noise is None in evaluation)
            choice = logits + jax.random.gumbel(k_noise, logits.shape)
        else:
            choice = gates
        first = jnp.argmax(choice, axis=-1)
        mask1 = jax.nn.one_hot(first, e, dtype=jnp.int32)
        aux = jnp.sum(jnp.mean(gates, axis=0) * jnp.mean(mask1.astype(jnp.float32), axis=0)) * e
        if use_rts and k_rts is not None:
            # Per expert, keep the `cap` routed tokens with the largest uniform draw (InternEvo's topk over
            # mask1 * U(0, 1)); unrouted tokens score 0 and so rank after every routed one.
            score = mask1 * jax.random.uniform(k_rts, mask1.shape)
            rank = jnp.argsort(jnp.argsort(-score, axis=0), axis=0)
            mask1 = mask1 * (rank < cap)
        else:
            mask1 = mask1 * (jnp.cumsum(mask1, axis=0) <= cap)
        slots = jnp.sum((jnp.cumsum(mask1, axis=0) - 1) * mask1, axis=-1)
        kept = jnp.sum(mask1, axis=-1) > 0
        weight = jnp.take_along_axis(gates, first[:, None], axis=-1)[:, 0] * kept
        return Routing(first[:, None], weight[:, None], slots[:, None], kept[:, None], aux)
    first = jnp.argmax(gates, axis=-1)
    mask1 = jax.nn.one_hot(first, e, dtype=jnp.int32)
    noisy = logits if k_noise is None else logits + jax.random.gumbel(k_noise, logits.shape)
    second = jnp.argmax(jnp.where(mask1 > 0, jnp.finfo(jnp.float32).min, noisy), axis=-1)
    mask2 = jax.nn.one_hot(second, e, dtype=jnp.int32)
    loc1 = jnp.cumsum(mask1, axis=0) - 1
    loc2 = jnp.cumsum(mask2, axis=0) - 1 + jnp.sum(mask1, axis=0, keepdims=True)  # behind all first choices
    aux = jnp.mean(jnp.mean(gates, axis=0) * jnp.mean(mask1.astype(jnp.float32), axis=0)) * e * e
    mask1, mask2 = mask1 * (loc1 < cap), mask2 * (loc2 < cap)
    slot1, slot2 = jnp.sum(loc1 * mask1, axis=-1), jnp.sum(loc2 * mask2, axis=-1)
    g1 = jnp.sum(gates * mask1, axis=-1)
    g2 = jnp.sum(gates * mask2, axis=-1)
    denom = jnp.maximum(g1 + g2, jnp.finfo(jnp.float32).eps)
    experts = jnp.stack([first, second], axis=-1)
    weights = jnp.stack([g1 / denom, g2 / denom], axis=-1)
    kept = jnp.stack([jnp.sum(mask1, -1) > 0, jnp.sum(mask2, -1) > 0], axis=-1)
    return Routing(experts, weights, jnp.stack([slot1, slot2], axis=-1), kept, aux)


def _swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, spec: str) -> jax.Array:
    """``w2(silu(w1 x) * w3 x)`` with einsum ``spec`` pieces: (in, up weight, hidden, down weight, out)."""
    xs, ws, hs, w2s, ys = spec.split(",")
    h = jax.nn.silu(jnp.einsum(f"{xs},{ws}->{hs}", x, w1)) * jnp.einsum(f"{xs},{ws}->{hs}", x, w3)
    return jnp.einsum(f"{hs},{w2s}->{ys}", h, w2)


class MoE(nnx.Module):
    """Router + E SwiGLU experts (+ the residual MLP of ``moe_use_residual``). ``__call__`` returns the output and
    the layer's aux loss (not yet scaled by ``loss.moe_loss_coeff``)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        rngs: nnx.Rngs,
        stack: tuple[int, ...],
        out_scale: jax.Array,
        init: Any,
    ):
        d, e = cfg.hidden_size, cfg.num_experts
        f = ffn_width(d, cfg.mlp_ratio, cfg.multiple_of)
        moe = cfg.moe
        self.num_experts, self.top_k = e, moe.top_k
        self.capacity_factor, self.eval_capacity_factor = moe.capacity_factor, moe.eval_capacity_factor
        self.min_capacity, self.drop_tokens, self.use_rts = moe.min_capacity, moe.drop_tokens, moe.use_rts
        self.noisy_gate_policy = moe.noisy_gate_policy
        self.dropless = cfg.moe_type == "MegaBlock-D"
        lead = ("layers",) * len(stack)
        up, other = cfg.ffn_uplayer_init_std, cfg.ffn_other_init_std

        def param(shape: tuple[int, ...], std: float, axes: tuple[str, ...], scale: bool = False) -> nnx.Param:
            value = init(rngs.params(), stack + shape, std, cfg.init_type)
            if scale:
                value = value * out_scale.reshape(stack + (1,) * len(shape))
            return nnx.Param(value, axes=lead + axes)

        self.wg = param((d, e), up, ("embed", "expert_gate"))
        self.w1 = param((e, d, f), up, ("expert", "embed", "expert_mlp"))
        self.w3 = param((e, d, f), up, ("expert", "embed", "expert_mlp"))
        self.w2 = param((e, f, d), other, ("expert", "expert_mlp", "embed"), scale=True)
        self.residual = cfg.moe_use_residual
        if self.residual:
            self.res_w1 = param((d, f), up, ("embed", "mlp"))
            self.res_w3 = param((d, f), up, ("embed", "mlp"))
            self.res_w2 = param((f, d), other, ("mlp", "embed"), scale=True)
            self.coefficient = param((d, 2), up, ("embed", "expert_gate"))
            self.coefficient_bias = nnx.Param(jnp.zeros(stack + (2,), jnp.float32), axes=lead + ("expert_gate",))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], aux loss scalar fp32). ``key`` None: evaluation."""
        b, t, _ = x.shape
        training = key is not None
        k_jitter, k_gate = (None, None) if key is None else jax.random.split(key)
        gate_in = x.astype(jnp.float32)
        if self.noisy_gate_policy == "Jitter" and k_jitter is not None:  # training
            gate_in = gate_in * jax.random.uniform(k_jitter, gate_in.shape, jnp.float32, 0.99, 1.01)
        logits = jnp.einsum("btd,de->bte", gate_in, self.wg[...], preferred_element_type=jnp.float32)
        if self.drop_tokens and not self.dropless:
            factor = self.capacity_factor if training else self.eval_capacity_factor
            cap = capacity(t, self.num_experts, factor, self.min_capacity, self.top_k)
        else:
            cap = t  # no expert can receive more than every token of the row
        keys = None if k_gate is None else jax.random.split(k_gate, b)
        policy = self.noisy_gate_policy if training else None
        route = jax.vmap(lambda lg, k: gate(lg, self.top_k, cap, k, policy, self.use_rts))(logits, keys)
        dtype = x.dtype
        w1, w3, w2 = (w[...].astype(dtype) for w in (self.w1, self.w3, self.w2))
        if self.dropless:
            y = _dropless(x, route, w1, w3, w2, self.num_experts)
        else:
            y = _capacity_dispatch(x, route, w1, w3, w2, self.num_experts, cap)
        if self.residual:
            r1, r3, r2 = (w[...].astype(dtype) for w in (self.res_w1, self.res_w3, self.res_w2))
            dense = _swiglu(x, r1, r3, r2, "btd,df,btf,fd,btd")
            c = jnp.einsum("btd,dc->btc", x, self.coefficient[...].astype(dtype)) + self.coefficient_bias[...].astype(
                dtype
            )
            c = jax.nn.softmax(c, axis=-1)
            y = y * c[..., 0:1] + dense * c[..., 1:]
        return y, jnp.mean(route.aux_loss)


def _capacity_dispatch(
    x: jax.Array, route: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array, e: int, cap: int
) -> jax.Array:
    """Kept tokens scattered into [B, E, C, D] buffers, the experts as one batched matmul, gathered back weighted."""
    b, t, d = x.shape
    rows = jnp.arange(b)[:, None, None]
    # Dropped choices point past the buffer; scatter mode "drop" discards them.
    slot = jnp.where(route.kept, route.slots, cap)
    buf = (
        jnp.zeros((b, e, cap, d), x.dtype)
        .at[rows, route.experts, slot]
        .add(jnp.broadcast_to(x[:, :, None, :], route.experts.shape + (d,)), mode="drop")
    )
    # The all-to-all of expert parallelism: rows sharded over the batch axes -> experts over the expert axis.
    buf = constrain(buf, ("act_expert_batch", "act_expert", None, None))
    out = _swiglu(buf, w1, w3, w2, "becd,edf,becf,efd,becd")
    out = constrain(out, ("act_expert_batch", "act_expert", None, None))
    out = constrain(out, ("act_batch", None, None, None))
    got = out.at[rows, route.experts, slot].get(mode="fill", fill_value=0)  # [B, T, k, D]
    return jnp.einsum("btkd,btk->btd", got, route.weights.astype(x.dtype))


def _dropless(x: jax.Array, route: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array, e: int) -> jax.Array:
    """Every (token, choice) pair sorted by expert and run as grouped GEMMs (``jax.lax.ragged_dot``)."""
    b, t, d = x.shape
    k = route.experts.shape[-1]
    flat_expert = route.experts.reshape(-1)  # [B*T*k]
    order = jnp.argsort(flat_expert, stable=True)
    tokens = jnp.repeat(x.reshape(b * t, d), k, axis=0)[order]
    sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(tokens, w1, sizes)) * jax.lax.ragged_dot(tokens, w3, sizes)
    out = jax.lax.ragged_dot(h, w2, sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(b, t, k, d)
    return jnp.einsum("btkd,btk->btd", unsorted, route.weights.astype(x.dtype))
