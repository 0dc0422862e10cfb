"""InternEvo's ``FlashGPTLMLoss`` semantics: labels -100 ignored, PyTorch label smoothing, fp32 math (LS-01)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-row summed token loss and token count.

    Args:
      logits: [B, T, V] (any float dtype; upcast to fp32).
      labels: [B, T] int; ``IGNORE_INDEX`` marks non-targets.
      label_smoothing: eps of ``(1 - eps) * nll + eps * mean_v(-log p_v)``.

    Returns:
      (loss_sum [B], count [B]) in fp32, so callers can form InternEvo's per-micro-batch mean or a token-weighted one.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = logz - target
    if label_smoothing:
        smooth = logz - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    loss = jnp.where(valid, loss, 0.0)
    return loss.sum(axis=-1), valid.sum(axis=-1).astype(jnp.float32)
