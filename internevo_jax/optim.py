"""AdamW with InternEvo's warmup-cosine lr and beta2 schedules, clipping and the dynamic loss scaler (O-04).

The schedules' formulas: docs/internevo_parity.md#lr-and-beta2-schedules.

Schedules are functions of ``k``, the number of successful updates so far (optax's ``count``, which a skipped step
does not advance). The update with index k uses ``lr(k)``; the log line shows ``lr(k + 1)``, the next update's lr,
exactly as InternEvo logs ``param_groups[0]["lr"]`` after the scheduler step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]


def lr_schedule(adam: ml_collections.ConfigDict, sched: ml_collections.ConfigDict) -> Schedule:
    """``FineTuneCosineAnnealingWarmupLR`` in closed form.

    lr(k) = 0 for k < init_steps; base * (k + 1 - init_steps) / warmup_steps during warmup; then
    eta_min + (start - eta_min) * (1 + cos(pi * (k - W) / (total - W))) / 2 with W = init_steps + warmup_steps.
    ``start`` is base, except that InternEvo's recursion starts from 0 when init_steps > 0 and there is no warmup.
    """
    base, eta_min, init = adam.lr, sched.eta_min, sched.init_steps
    total = sched.total_steps
    warmup = int(total * sched.warmup_ratio)
    w = init + warmup
    start = base if warmup > 0 or init == 0 else 0.0
    span = max(total - w, 1)

    def lr(k: jax.Array) -> jax.Array:
        k = jnp.asarray(k, jnp.float32)
        warm = base * (k + 1 - init) / max(warmup, 1)
        cos = eta_min + (start - eta_min) * (1 + jnp.cos(jnp.pi * (k - w) / span)) / 2
        return jnp.where(k < init, 0.0, jnp.where(k < w, warm, cos))

    return lr


def beta2_schedule(sched: ml_collections.ConfigDict) -> Schedule:
    """``Beta2Scheduler``: beta2(k) = init_beta2 if c <= 0 else max(init_beta2, 1 - k^-c)."""
    b0, c = sched.init_beta2, sched.c

    def beta2(k: jax.Array) -> jax.Array:
        k = jnp.asarray(k, jnp.float32)
        if c <= 0:
            return jnp.full_like(k, b0)
        safe = jnp.maximum(k, 1.0)  # k = 0 gives 1 - inf -> init_beta2; keep the power finite
        return jnp.where(k > 0, jnp.maximum(b0, 1.0 - safe ** (-c)), b0)

    return beta2


def make_optimizer(
    adam: ml_collections.ConfigDict, lr_scheduler: ml_collections.ConfigDict, beta2_scheduler: ml_collections.ConfigDict
) -> optax.GradientTransformation:
    """torch-style AdamW (decoupled weight decay on every parameter, O-01) with both schedules injected."""
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr_schedule(adam, lr_scheduler),
        b1=adam.adam_beta1,
        b2=beta2_schedule(beta2_scheduler),
        eps=adam.adam_eps,
        weight_decay=adam.weight_decay,
    )


def clip_by_global_norm(grads: optax.Updates, norm: jax.Array, max_norm: float) -> optax.Updates:
    """InternEvo's clipping (O-07): divide by ``(norm + 1e-6) / max_norm`` when that exceeds 1; 0 disables."""
    if max_norm <= 0:
        return grads
    coef = (norm + 1e-6) / max_norm
    return jax.tree.map(lambda g: jnp.where(coef > 1, g / coef, g), grads)


class LossScale(NamedTuple):
    """Dynamic loss scaler state, as InternEvo saves it: ``{_scale, _growth_step, _hysteresis_step}``."""

    scale: jax.Array
    growth_step: jax.Array
    hysteresis_step: jax.Array


def init_loss_scale(grad_scaler: ml_collections.ConfigDict, dtype: str) -> LossScale:
    """2^16 by default for fp16 and bf16 (InternEvo scales bf16 too, quirk 5.1); a fixed 1 for fp32."""
    scale = 1.0 if dtype == "float32" else float(grad_scaler.fp16.initial_scale)
    return LossScale(jnp.float32(scale), jnp.int32(0), jnp.int32(0))


def update_loss_scale(
    ls: LossScale, finite: jax.Array, grad_scaler: ml_collections.ConfigDict, dtype: str
) -> LossScale:
    """One scaler step (O-04). Overflow: count hysteresis, back off once it reaches ``hysteresis`` (InternEvo never
    resets the hysteresis count on backoff). Good step: grow every ``growth_interval`` good steps."""
    if dtype == "float32":
        return ls
    gs = grad_scaler
    hyst = jnp.where(finite, ls.hysteresis_step, ls.hysteresis_step + 1)
    backoff = (~finite) & (hyst >= gs.hysteresis)
    growth = jnp.where(finite, ls.growth_step + 1, 0)
    grow = finite & (growth == gs.fp16.growth_interval)
    scale = jnp.where(backoff, jnp.maximum(ls.scale * gs.backoff_factor, float(gs.fp16.min_scale)), ls.scale)
    scale = jnp.where(grow, jnp.minimum(scale * gs.growth_factor, float(gs.max_scale)), scale)
    return LossScale(
        scale.astype(jnp.float32),
        jnp.where(grow, 0, growth).astype(jnp.int32),
        jnp.where(grow, 0, hyst).astype(jnp.int32),
    )
