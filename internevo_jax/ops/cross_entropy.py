"""InternEvo's ``FlashGPTLMLoss`` semantics: labels -100 ignored, PyTorch label smoothing, fp32 math (LS-01).

Also the sums behind its ``AccPerplex`` / ``LossWithTypeId`` training metrics (MT-01..04), from the same logsumexp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from internevo_jax.data.packing import IGNORE_INDEX  # the label the data writes for non-targets


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


def chunked_cross_entropy_with_metrics(
    hidden: jax.Array,
    head: jax.Array,
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    type_ids: jax.Array,
    num_types: int,
    label_smoothing: float = 0.0,
    chunk: int = 0,
) -> tuple[jax.Array, jax.Array, MetricSums]:
    """``cross_entropy_with_metrics`` from hidden states, forming at most ``[B, chunk, V]`` logits at a time.

    The sequence is cut into ``chunk``-token slices run under ``lax.scan``; each slice is rematerialised in the
    backward pass, so neither the fp32 logits nor their gradient ever exist for the whole ``[B, T, V]``. A T that
    ``chunk`` does not divide is padded with ignored tokens; ``chunk`` 0 (or >= T) is one slice. Results equal the
    unchunked function up to summation order.

    Args:
      hidden: [B, T, D] final hidden states; head: [D, V]; ``logits_fn(hidden_slice, head)`` -> fp32 logits.
      labels, type_ids, num_types, label_smoothing: as ``cross_entropy_with_metrics``.
    """
    b, t, _ = hidden.shape
    if chunk <= 0 or chunk >= t:
        return cross_entropy_with_metrics(logits_fn(hidden, head), labels, type_ids, num_types, label_smoothing)
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        type_ids = jnp.pad(type_ids, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def slices(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(h: jax.Array, w: jax.Array, lab: jax.Array, typ: jax.Array):
        return cross_entropy_with_metrics(logits_fn(h, w), lab, typ, num_types, label_smoothing)

    def body(acc, xs):
        h, lab, typ = xs
        out = one(h, head, lab, typ)
        return jax.tree.map(jnp.add, acc, out), None

    zeros = jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype),
        jax.eval_shape(one, hidden[:, :chunk], head, labels[:, :chunk], type_ids[:, :chunk]),
    )
    total, _ = jax.lax.scan(body, zeros, (slices(hidden), slices(labels), slices(type_ids)))
    return total


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
