"""Attention kernels behind one dispatch. ``xla`` is the segment-aware reference and the oracle for the others.

Shapes: B batch rows, T query length, S key length (= T here), K kv heads, G query heads per kv head, H head dim.
Packed rows carry ``segment_ids`` (one id per sample piece); a query attends to keys of its own segment at or
before its own position in the row, which is InternEvo's flash-attn varlen with ``cu_seqlens`` (M-13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax instead of NaN


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, dropout: tuple[float, jax.Array] | None = None
) -> jax.Array:
    """Causal, segment-masked GQA attention in plain XLA.

    Args:
      q: [B, T, K, G, H] queries, grouped by the kv head they read.
      k: [B, S, K, H] keys.
      v: [B, S, K, H] values.
      segment_ids: [B, T] int; equal ids attend to each other.
      dropout: (rate, key) drops attention probabilities (``attn_drop_rate``); None in evaluation.

    Returns:
      [B, T, K, G, H] in q's dtype. Softmax runs in fp32.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    t = q.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    mask = (causal[None] & same)[:, None, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1)
    if dropout is not None:
        rate, key = dropout
        probs = jnp.where(jax.random.bernoulli(key, 1.0 - rate, probs.shape), probs / (1.0 - rate), 0.0)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)


IMPLS = {"xla": xla_attention}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    impl: str = "xla",
    dropout: tuple[float, jax.Array] | None = None,
) -> jax.Array:
    """Dispatches to the kernel named by ``model.attn_impl`` (validated at config load)."""
    if dropout is None:
        return IMPLS[impl](q, k, v, segment_ids)
    return IMPLS[impl](q, k, v, segment_ids, dropout)
