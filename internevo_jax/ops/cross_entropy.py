"""InternEvo's ``FlashGPTLMLoss`` semantics: labels -100 ignored, PyTorch label smoothing, fp32 math (LS-01).

Also the sums behind its ``AccPerplex`` / ``LossWithTypeId`` training metrics (MT-01..04), from the same logsumexp.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


class MetricSums(NamedTuple):
    """Sums over the tokens with a label; they add up across micro-batches and rows, ratios are taken at the end."""

    right: jax.Array  # [] int32: argmax over the vocab == label
    tokens: jax.Array  # [] int32
    nll: jax.Array  # [] fp32: plain cross-entropy, never label-smoothed (LossWithTypeId's loss has no smoothing)
    type_right: jax.Array  # [num_types] int32
    type_tokens: jax.Array  # [num_types] int32
    type_nll: jax.Array  # [num_types] fp32


def metric_values(sums: MetricSums) -> dict[str, jax.Array]:
    """InternEvo's ``AccPerplex.get_metric`` ratios (before rounding), keeping its 0/0 = nan when a count is 0.

    ``type_*`` entries are ``[num_types]`` vectors for ``acc/{t}``, ``tokens/{t}`` and ``loss/{t}``.
    """
    return dict(
        acc=sums.right / sums.tokens,
        perplexity=jnp.exp(sums.nll / sums.tokens),
        loss_from_metric=sums.nll / sums.tokens,
        type_acc=sums.type_right / (sums.type_tokens + 1e-5),
        type_tokens=sums.type_tokens,
        type_loss=sums.type_nll / sums.type_tokens,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-row summed token loss and token count.

    Args:
      logits: [B, T, V] (any float dtype; upcast to fp32).
      labels: [B, T] int; ``IGNORE_INDEX`` marks non-targets.
      label_smoothing: eps of ``(1 - eps) * nll + eps * mean_v(-log p_v)``.

    Returns:
      (loss_sum [B], count [B]) in fp32, so callers can form InternEvo's per-micro-batch mean or a token-weighted one.
    """
    _, loss, _, valid = _token_losses(logits, labels, label_smoothing)
    return loss.sum(axis=-1), valid.sum(axis=-1).astype(jnp.float32)


def cross_entropy_with_metrics(
    logits: jax.Array, labels: jax.Array, type_ids: jax.Array, num_types: int, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, MetricSums]:
    """``cross_entropy`` plus the micro-batch's ``MetricSums``, sharing one logsumexp.

    Args:
      logits, labels, label_smoothing: as ``cross_entropy``.
      type_ids: [B, T] int dataset type of each token; ids outside ``[0, num_types)`` count only in the totals.
      num_types: the number of dataset types (static).

    Returns:
      (loss_sum [B], count [B], sums). Only ``loss_sum`` is meant to be differentiated.
    """
    logits, loss, nll, valid = _token_losses(logits, labels, label_smoothing)
    # First maximal index, as torch.argmax, so ties count as InternEvo counts them.
    right = valid & (jnp.argmax(logits, axis=-1) == labels)
    in_type = (type_ids[..., None] == jnp.arange(num_types)) & valid[..., None]  # [B, T, K], K is small
    sums = MetricSums(
        right=right.sum(dtype=jnp.int32),
        tokens=valid.sum(dtype=jnp.int32),
        nll=nll.sum(),
        type_right=(in_type & right[..., None]).sum(axis=(0, 1), dtype=jnp.int32),
        type_tokens=in_type.sum(axis=(0, 1), dtype=jnp.int32),
        type_nll=jnp.where(in_type, nll[..., None], 0.0).sum(axis=(0, 1)),
    )
    return loss.sum(axis=-1), valid.sum(axis=-1).astype(jnp.float32), sums


def _token_losses(
    logits: jax.Array, labels: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(fp32 logits, training loss, plain nll, valid), the losses [B, T] and zero where the label is ignored."""
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    nll = logz - target
    loss = nll
    if label_smoothing:
        smooth = logz - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return logits, jnp.where(valid, loss, 0.0), jnp.where(valid, nll, 0.0), valid
