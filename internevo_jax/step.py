"""The train state and the one jitted step: ``TrainState``, its shardings, and the pure loss / train / eval functions.

``make_train_step`` builds ``(state, batch) -> (state, metrics)``: micro-batches accumulated under ``lax.scan`` (or
run through the pipeline schedule of ``pipeline.py`` when ``parallel.pipeline.size > 1``), one optimizer update
skipped on non-finite gradients, and InternEvo's metrics computed in-graph. ``train.py``'s ``Trainer`` compiles it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax import mesh as mesh_lib
from internevo_jax import pipeline
from internevo_jax.model import LanguageModel, build_model, logits
from internevo_jax.ops.cross_entropy import MetricSums, chunked_cross_entropy_with_metrics, metric_values
from internevo_jax.optim import (
    LossScale,
    beta2_schedule,
    clip_by_global_norm,
    lr_schedule,
    update_loss_scale,
)


class TrainState(NamedTuple):
    """Everything the step updates. ``opt_state``'s count is InternEvo's ``step_count`` (successful updates)."""

    params: dict
    opt_state: optax.OptState
    loss_scale: LossScale
    inf_nan_skips: jax.Array


def abstract_model(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and abstract (shape-only) state; no memory is allocated."""
    model = nnx.eval_shape(lambda: build_model(config.model_type, config.model, nnx.Rngs(0)))
    return nnx.split(model)


def state_shardings(abstract: TrainState, params: dict) -> TrainState:
    """Shardings for every leaf of the state: params by the rules table, optimizer moments ZeRO-1 sharded."""
    any_sharding = jax.tree.leaves(params)[0]
    replicated = mesh_lib.replicated(any_sharding.mesh)
    by_path = {
        _dict_path(path): (s, leaf.shape)
        for (path, s), leaf in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(abstract.params), strict=True
        )
    }

    def opt_leaf(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.sharding.Sharding:
        key = _dict_path(path)
        for n in range(len(key)):
            hit = by_path.get(key[n:])
            if hit is not None and hit[1] == leaf.shape:
                return mesh_lib.zero1_sharding(hit[0], leaf.shape)
        return replicated

    return TrainState(
        params=params,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state),
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
        inf_nan_skips=jax.tree.map(lambda _: replicated, abstract.inf_nan_skips),  # (one leaf, as loss_scale's)
    )


def _dict_path(path: tuple) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def is_moe(config: ml_collections.ConfigDict) -> bool:
    """Whether the model has mixture-of-experts layers (an aux loss, and routing noise in training)."""
    return config.model.num_experts > 1


def make_loss_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, num_types: int):
    """``(params, micro_batch, scale, dropout_key) -> (scaled loss, (loss, MetricSums))`` for one micro-batch;
    a MoE model adds ``moe_loss`` to the aux tuple (``loss.moe_loss_coeff`` x the layers' aux losses), and its
    scaled loss includes it.

    The loss is InternEvo's: the mean over rows (each a micro-batch of one data-parallel rank) of the row's mean
    token loss; the metric sums are InternEvo's ``AccPerplex`` ones (MT-01..04) over ``num_types`` dataset types.

    With ``parallel.pipeline.size > 1`` the function takes all micro-batches at once (``[micro_num, rows, P]``
    arrays, and the step's dropout key, from which micro-batch i draws ``fold_in(key, i)`` as the accumulation loop
    does), since they must share one pass through the pipeline; its loss is then the mean over micro-batches of the
    per-micro-batch loss and the metric sums are over all of them.
    """
    label_smoothing = config.loss.label_smoothing
    chunk = config.loss.logits_chunk_size
    stages, chunks = config.parallel.pipeline.size, config.model.num_chunks
    moe, moe_coeff = is_moe(config), config.loss.moe_loss_coeff

    def head_loss(model: LanguageModel, hidden: jax.Array, mb: dict[str, jax.Array]) -> tuple[jax.Array, MetricSums]:
        loss_sum, count, sums = chunked_cross_entropy_with_metrics(
            hidden, model.head_weight(), logits, mb["labels"], mb["type_ids"], num_types, label_smoothing, chunk
        )
        return jnp.mean(loss_sum / jnp.maximum(count, 1.0)), sums

    def loss_fn(params: dict, mb: dict[str, jax.Array], scale: jax.Array, key: jax.Array | None):
        model = nnx.merge(graphdef, params)
        with model.matmul_precision():
            if moe:
                hidden, aux = model.features_and_moe_loss(mb["tokens"], mb["positions"], mb["segment_ids"], key)
            else:
                hidden = model.features(mb["tokens"], mb["positions"], mb["segment_ids"], key)
            loss, sums = head_loss(model, hidden, mb)
        if not moe:
            return loss * scale, (loss, sums)
        # LS-04: the scaled aux loss of every layer is added to the loss that is differentiated; the reported loss
        # is without it and moe_loss is reported beside it.
        moe_loss = moe_coeff * aux
        return (loss + moe_loss) * scale, (loss, sums, moe_loss)

    def pipelined_loss_fn(params: dict, batch: dict[str, jax.Array], scale: jax.Array, key: jax.Array | None):
        model = nnx.merge(graphdef, params)
        micro_ids = jnp.arange(batch["tokens"].shape[0])
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(micro_ids)
        with model.matmul_precision():
            hidden, aux = pipeline.features_and_moe_loss(
                model, batch["tokens"], batch["positions"], batch["segment_ids"], keys, stages, chunks
            )
            # The head and loss one micro-batch at a time, so at most one micro-batch's logits chunk is live.
            _, (losses, sums) = jax.lax.scan(lambda _, xs: (None, head_loss(model, *xs)), None, (hidden, batch))
        loss = jnp.mean(losses)
        sums = jax.tree.map(lambda x: x.sum(axis=0), sums)
        if not moe:
            return loss * scale, (loss, sums)
        moe_loss = moe_coeff * aux / losses.shape[0]  # the mean over micro-batches, as the accumulation loop's
        return (loss + moe_loss) * scale, (loss, sums, moe_loss)

    return loss_fn if stages == 1 else pipelined_loss_fn


def make_train_step(
    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, num_types: int
):
    """Builds the pure ``(state, batch) -> (state, metrics)`` step.

    ``batch`` arrays are ``[micro_num, rows, packed_length]``; micro-batches are accumulated under ``lax.scan``, or,
    with ``parallel.pipeline.size > 1``, all go through the pipeline in one forward and one gradient (as InternEvo's
    pipeline runs its ``micro_num`` micro-batches). The loss is the mean over micro-batches of the per-micro-batch
    loss; the metrics hold the ``AccPerplex`` values over the whole step, the per-dataset-type ones (``type_*``) as
    ``[num_types]`` vectors.
    """
    dtype = config_lib.jax_dtype_name(config.model)
    max_norm = config.hybrid_zero_optimizer.clip_grad_norm
    lr_fn = lr_schedule(config.adam, config.lr_scheduler)
    beta2_fn = beta2_schedule(config.beta2_scheduler)
    grad_scaler = config.grad_scaler
    # MoE routing draws noise (Gumbel second expert, RTS, Jitter/RSample) from the same per-step key.
    dropout = bool(config.model.drop_rate or config.model.attn_drop_rate) or is_moe(config)
    base_key = jax.random.key(config.seed)
    loss_fn = make_loss_fn(config, graphdef, num_types)
    pipelined = config.parallel.pipeline.size > 1

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        scale = state.loss_scale.scale
        # Dropout masks are a pure function of (seed, batch number, micro-batch), so a resumed run draws the same.
        step_key = jax.random.fold_in(base_key, state.opt_state.count + state.inf_nan_skips) if dropout else None

        def micro(acc: dict, xs: tuple[dict[str, jax.Array], jax.Array]):
            mb, i = xs
            key = None if step_key is None else jax.random.fold_in(step_key, i)
            (_, aux), grads = grad_fn(state.params, mb, scale, key)
            return jax.tree.map(jnp.add, acc, grads), aux

        extra = {}
        if pipelined:
            (_, (loss, sums, *moe_loss)), grads = grad_fn(state.params, batch, scale, step_key)
            grads = jax.tree.map(lambda g: g / scale, grads)
            if moe_loss:
                extra["moe_loss"] = moe_loss[0]
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            micro_ids = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
            grads, (losses, sums, *moe_losses) = jax.lax.scan(micro, zeros, (batch, micro_ids))
            sums = jax.tree.map(lambda x: x.sum(axis=0), sums)  # over micro-batches; rows are already summed
            micro_num = losses.shape[0]
            grads = jax.tree.map(lambda g: g / (micro_num * scale), grads)
            loss = jnp.mean(losses)
            if moe_losses:
                extra["moe_loss"] = jnp.mean(moe_losses[0])  # InternEvo divides each by micro_num and sums
        grad_norm = optax.tree.norm(grads)  # logged before clipping, unscaled (O-06)
        finite = jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(
                clip_by_global_norm(grads, grad_norm, max_norm), state.opt_state, state.params
            )
            return optax.apply_updates(state.params, updates), opt_state

        # A non-finite step leaves params and optimizer state untouched, so the schedules do not advance either.
        params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
        new = TrainState(
            params=params,
            opt_state=opt_state,
            loss_scale=update_loss_scale(state.loss_scale, finite, grad_scaler, dtype),
            inf_nan_skips=state.inf_nan_skips + (~finite).astype(jnp.int32),
        )
        count = opt_state.count
        metrics = dict(
            loss=loss,
            **metric_values(sums),
            grad_norm=grad_norm,
            finite=finite,
            lr=lr_fn(count),  # the next update's lr, as InternEvo logs it
            adam_beta2=beta2_fn(count),
            loss_scale=scale,
            inf_nan_skip_batches=new.inf_nan_skips,
            step_count=count,
            **extra,
        )
        return new, metrics

    return train_step


def make_eval_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, num_types: int):
    """``(params, batch) -> (loss, MetricSums)``: a forward-only pass over ``[micro_num, rows, P]`` (no dropout).

    ``loss`` is the mean over micro-batches of ``make_loss_fn``'s loss, as InternEvo's per-batch validation loss; with
    ``parallel.pipeline.size > 1`` the micro-batches go through the pipeline together.
    """
    loss_fn = make_loss_fn(config, graphdef, num_types)
    pipelined = config.parallel.pipeline.size > 1

    def eval_step(params: dict, batch: dict[str, jax.Array]) -> tuple[jax.Array, MetricSums]:
        if pipelined:
            _, (loss, sums, *_) = loss_fn(params, batch, jnp.float32(1.0), None)
            return loss, sums

        def micro(acc: MetricSums, mb: dict[str, jax.Array]):
            _, (loss, sums, *_) = loss_fn(params, mb, jnp.float32(1.0), None)
            return jax.tree.map(jnp.add, acc, sums), loss

        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(lambda: loss_fn(params, first, jnp.float32(1.0), None)[1][1])
        sums, losses = jax.lax.scan(micro, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), batch)
        return jnp.mean(losses), sums

    return eval_step
