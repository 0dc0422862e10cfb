"""Pipeline parallelism over the mesh's ``pipeline`` axis: an SPMD GPipe schedule and its circular (interleaved) form.

The model stays pipeline-agnostic: it offers ``embed``, ``rope``, ``run_layers`` (a stack of consecutive layers under
scan + remat) and ``final_norm``; this module cuts the stacked layer params ``[L, ...]`` into stages and moves the
micro-batches through them. Embedding, head and loss run outside the pipeline, replicated over its axis (the same
wall time as the last stage doing them alone; it costs a broadcast of the final hidden states from stage 0 and an
all-reduce of the embedded inputs' gradient over ``pipeline``).

Schedule. P stages, V = ``model.num_chunks`` chunks per stage, M micro-batches (InternEvo's ``micro_num``), all in one
forward and one gradient (GPipe: all forwards, then the backward that autodiff derives; not 1F1B). A state buffer
``[P, micro-batch...]`` holds each stage's input; one iteration is ``jax.vmap`` over the stage dim of "run my chunk
of layers", then the buffer is rolled one stage along (``jnp.roll`` on a dim sharded over ``pipeline``, which XLA
lowers to one collective-permute). Stage 0 takes micro-batch ``t mod M`` from a pool ``[M, micro-batch...]`` that
starts as the embedded inputs; what the last stage finishes arrives at stage 0 with the roll and is written back to
the pool, to enter again M iterations later for its next chunk (hence M >= P when V > 1) or, after chunk V - 1, to be
the output. M·V + P - 1 iterations; stage s is busy in M·V of them, so the bubble is (P - 1) / (M·V + P - 1).

Layer placement is InternEvo's ``partition_uniform`` (Megatron's interleaving too): with Lc = L / (P·V), chunk c of
stage p holds layers ``c·P·Lc + p·Lc + j`` (j < Lc), i.e. the stack viewed as ``[V, P, Lc, ...]``. A micro-batch
visits stages 0..P-1 for chunk 0, then again for chunk 1, and so on. V = 1 is GPipe with stage p holding the
contiguous block ``[p·L/P, (p+1)·L/P)``, exactly what the rules table's ``"layers" -> "pipeline"`` stores, so the view
costs nothing. For V > 1 the parameters keep the canonical layer order (checkpoints, conversion and every other layout
read the same ``[L, ...]`` arrays) with that contiguous sharding, so XLA moves about (P - 1)/P of the layer weights
into the ``[V, P, Lc]`` placement once per step (an all-to-all; the gradients go back the same way). Storing the
stack permuted would remove that at the cost of a layout-dependent checkpoint format.

Per-layer inputs that are not params travel with their micro-batch through the stages in the same rolled buffer:
RoPE cos/sin and segment ids (per micro-batch) and the per-layer dropout keys (each stage picks its chunk's).

Why vmap + roll rather than ``jax.shard_map`` + ``ppermute``: inside ``vmap(spmd_axis_name="pipeline")`` the model's
own ``constrain`` calls keep working (the stage dim is added to every constraint), so data, ZeRO/FSDP, tensor and
sequence parallelism compose with the pipeline unchanged, and the code needs no mesh handle. A ``shard_map`` would
make the stage body manual over ``pipeline`` and need those constraints rewritten for a partially manual mesh.

Memory: GPipe keeps what the backward needs of every micro-batch: each stage saves its inputs for all M·V + P - 1
iterations plus what the remat policy keeps inside its layers, about M/P times the activations of one micro-batch
through the whole stack that the non-pipelined path (one micro-batch at a time) keeps. The pool adds M micro-batch
activations ``[rows, T, D]`` per device. Parameters and optimizer state of the layers shrink 1/P per device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from internevo_jax.mesh import constrain
from internevo_jax.model import Decoder

_ACT = ("act_batch", "act_length", "act_embed")


def layer_placement(num_layers: int, num_stages: int, num_chunks: int) -> jax.Array:
    """``[V, P, Lc]`` layer ids: entry (c, p, j) is the j-th layer of chunk c on stage p (InternEvo's assignment)."""
    lc = num_layers // (num_stages * num_chunks)
    return jnp.arange(num_layers).reshape(num_chunks, num_stages, lc)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def run(
    stage_fn: Callable[[Any, jax.Array, Any, Any], tuple[jax.Array, jax.Array]],
    stack: nnx.State,
    x: jax.Array,
    extras: Any,
    per_layer: Any,
    num_stages: int,
    num_chunks: int,
) -> tuple[jax.Array, jax.Array]:
    """The schedule: micro-batches ``x`` [M, B, T, D] through all layers of ``stack`` -> [M, B, T, D].

    Returns the outputs and the sum of what ``stage_fn`` reports besides its activations (the MoE aux loss) over
    every micro-batch and layer: a stage's report counts only in the iterations where it holds real work (0 <= t - s
    < M·V), not in the bubble.

    Args:
      stage_fn: ``(chunk_params, x [B, T, D], extras, chunk_per_layer) -> (x, aux scalar)``, running one chunk's Lc
        layers.
      stack: the stacked layer params (leading dim L, canonical order); leaves are ``nnx.Variable``s whose ``axes``
        metadata names the dims (the first is ``"layers"``).
      extras: pytree of ``[M, ...]`` per-micro-batch inputs every layer reads (RoPE tables, segment ids).
      per_layer: pytree of ``[M, L, ...]`` per-micro-batch, per-layer inputs (dropout key data), or None.
      num_stages, num_chunks: P and V.
    """
    p, v, m = num_stages, num_chunks, x.shape[0]
    num_layers = jax.tree.leaves(stack)[0].shape[0]
    lc = num_layers // (p * v)
    if lc * p * v != num_layers or (v > 1 and m < p):
        raise ValueError(
            f"pipeline: {num_layers} layers, {p} stages, {v} chunks, {m} micro-batches (see config.check_pipeline)"
        )

    def to_stages(var: nnx.Variable) -> nnx.Variable:  # [L, ...] -> [V, P, Lc, ...], the P dim on "pipeline"
        a = var[...]
        a = a.reshape((v, p, lc) + a.shape[1:])
        return var.replace(constrain(a, (None, "layers", None) + tuple(var.get_metadata()["axes"][1:])))

    params = jax.tree.map(to_stages, stack, is_leaf=_is_var)
    per_layer = jax.tree.map(lambda a: a.reshape((m, v, p, lc) + a.shape[2:]), per_layer)
    payload = (extras, per_layer)  # what a micro-batch carries besides its activations
    stage_ids = jnp.arange(p)

    def stage(params_s: Any, s: jax.Array, state_s: tuple, pool_s: jax.Array, t: jax.Array) -> tuple:
        """One stage, one iteration (vmapped over stages): params_s [V, Lc, ...], pool_s [M, B, T, D]."""
        x_s, load_s = state_s
        first = s == 0
        # What the last stage finished in the previous iteration has just arrived here: stage 0 files it.
        done = (t - p) % m
        pool_s = pool_s.at[done].set(jnp.where(first & (t >= p), x_s, pool_s[done]))
        # Stage 0 starts micro-batch t mod M (its next chunk); the others take what the previous stage sent.
        x_in = constrain(jnp.where(first, pool_s[t % m], x_s), _ACT)
        load_in = jax.tree.map(lambda a, b: jnp.where(first, a[t % m], b), payload, load_s)
        extras_in, per_layer_in = load_in
        c: int | jax.Array  # the chunk this stage runs now
        if v == 1:
            chunk, c = jax.tree.map(lambda a: a[0], params_s), 0
        else:
            c = jnp.clip((t - s) // m, 0, v - 1)
            chunk = jax.tree.map(lambda a: a[c], params_s)
        layer_in = jax.tree.map(lambda a: a[c, s], per_layer_in)
        y, aux = stage_fn(chunk, x_in, extras_in, layer_in)
        busy = (t - s >= 0) & (t - s < m * v)
        return (constrain(y, _ACT), load_in), constrain(pool_s, (None,) + _ACT), jnp.where(busy, aux, 0.0)

    vstage = jax.vmap(stage, in_axes=(1, 0, 0, 0, None), spmd_axis_name="pipeline")

    def iteration(carry: tuple, t: jax.Array) -> tuple[tuple, None]:
        state, pool, aux_sum = carry
        out, pool, aux = vstage(params, stage_ids, state, pool, t)
        # Stage s's output becomes stage s+1's input, the last stage's goes to stage 0: one collective-permute.
        return (jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), out), pool, aux_sum + aux), None

    def stages_of(a: jax.Array) -> jax.Array:
        return jnp.broadcast_to(a[None], (p,) + a.shape)

    x = constrain(x, (None,) + _ACT)  # every stage holds all micro-batches' inputs (the embedding is replicated)

    first_load = jax.tree.map(lambda a: jnp.zeros_like(stages_of(a[0])), payload)
    state = (jnp.zeros((p,) + x.shape[1:], x.dtype), first_load)
    # Every stage holds a pool (the same memory as a replicated copy of the inputs); only stage 0's is used.
    iterations = m * v + p - 1
    # The stage dim is the layer dim cut P ways, so it takes that rule: "layers" -> "pipeline".
    pool = constrain(stages_of(x), ("layers", None) + _ACT)
    aux_sum = jnp.zeros((p,), jnp.float32)
    (state, pool, aux_sum), _ = jax.lax.scan(iteration, (state, pool, aux_sum), jnp.arange(iterations))
    # The last micro-batch's last chunk arrived at stage 0 with the final roll; the head runs on every stage.
    return constrain(pool[0].at[(iterations - p) % m].set(state[0][0]), (None,) + _ACT), jnp.sum(aux_sum)


def features(
    model: Decoder,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    dropout_keys: jax.Array | None,
    num_stages: int,
    num_chunks: int,
) -> jax.Array:
    """``Decoder.features`` for all micro-batches at once, the layer stack pipelined.

    tokens, positions, segment_ids: [M, B, T]; ``dropout_keys`` [M] (one per micro-batch, as the non-pipelined step
    draws them) or None. Returns the final hidden states [M, B, T, D], equal to ``features`` per micro-batch.
    """
    return features_and_moe_loss(model, tokens, positions, segment_ids, dropout_keys, num_stages, num_chunks)[0]


def features_and_moe_loss(
    model: Decoder,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    dropout_keys: jax.Array | None,
    num_stages: int,
    num_chunks: int,
) -> tuple[jax.Array, jax.Array]:
    """``features`` and the MoE aux loss summed over every micro-batch and layer (0 for a dense model)."""
    x = jax.vmap(model.embed)(tokens)
    cos, sin = jax.vmap(model.rope)(positions)  # per micro-batch, as features computes them (dynamic NTK included)
    per_layer, impl = None, None
    if dropout_keys is not None:
        impl = jax.random.key_impl(dropout_keys)
        per_layer = jax.random.key_data(jax.vmap(model.layer_keys)(dropout_keys))  # [M, L, ...] raw, so it can move

    def stage_fn(
        chunk: nnx.State, h: jax.Array, extras: tuple[jax.Array, jax.Array, jax.Array], key_data: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        keys = None if key_data is None else jax.random.wrap_key_data(key_data, impl=impl)
        return model.run_layers_and_moe_loss(h, chunk, *extras, keys)

    stack = nnx.state(model.layers)
    hidden, aux = run(stage_fn, stack, x, (cos, sin, segment_ids), per_layer, num_stages, num_chunks)
    return model.final_norm(hidden), aux
