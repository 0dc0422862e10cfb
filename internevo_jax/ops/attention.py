"""Attention kernels behind one dispatch. ``xla`` is the segment-aware reference and the oracle for the others.

Shapes: B batch rows, T query length, S key length (= T here), K kv heads, G query heads per kv head, H head dim.
Packed rows carry ``segment_ids`` (one id per sample piece); a query attends to keys of its own segment at or
before its own position in the row, which is InternEvo's flash-attn varlen with ``cu_seqlens`` (M-13).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from internevo_jax.config import ATTN_IMPLS
from internevo_jax.mesh import per_shard
from internevo_jax.ops.flash_attention import flash_attention

log = logging.getLogger("internevo_jax")

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
    t = q.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return masked_attention(q, k, v, causal[None] & same, dropout)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dropout: tuple[float, jax.Array] | None = None
) -> jax.Array:
    """GQA attention under an explicit mask: q [B, T, K, G, H] over k, v [B, S, K, H] where ``mask`` [B, T, S] is
    True -> [B, T, K, G, H] in q's dtype; scores and softmax in fp32. Training's XLA path and the KV-cache decode
    both use it, so the two agree on the scale, the masked value and the dtypes."""
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, _MASKED), axis=-1)
    if dropout is not None:
        rate, key = dropout
        probs = jnp.where(jax.random.bernoulli(key, 1.0 - rate, probs.shape), probs / (1.0 - rate), 0.0)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)


def segment_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Packed-row layout for cuDNN: ``(seqlens [B, M], offsets [B, M + 1])``, -1 past each row's last segment.

    Segments are the maximal runs of equal ids in a row (what the packer writes); ``offsets`` holds each run's
    first position. Rows with more than ``M`` runs would lose the extra ones, so the trainer checks the count on
    the host (``batch_stats``) before a batch reaches the device.
    """
    b, t = segment_ids.shape
    first = jnp.ones((b, 1), bool)
    starts_mask = jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    count = starts_mask.sum(axis=1, keepdims=True)  # [B, 1]
    starts = jax.vmap(lambda m: jnp.nonzero(m, size=max_segments + 1, fill_value=t)[0])(starts_mask)
    slot = jnp.arange(max_segments + 1)
    offsets = jnp.where(slot < count, starts, -1)
    seqlens = jnp.where(slot[:-1] < count, starts[:, 1:] - starts[:, :-1], -1)
    return seqlens.astype(jnp.int32), offsets.astype(jnp.int32)


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, max_segments: int = 64
) -> jax.Array:
    """cuDNN fused flash attention (GPU) on packed rows via ragged offsets: no [T, T] mask is ever built.

    Same contract as ``xla_attention`` (which is its oracle in the GPU tests). cuDNN reads query head ``n`` against
    kv head ``n // G``, the order of our ``[K, G]`` query layout. The packed-sequence entry point is not public in
    ``jax.nn.dot_product_attention`` (it takes no segment ids), hence the ``jax._src`` import.
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    b, t, kv, g, h = q.shape
    seqlens, offsets = segment_layout(segment_ids, max_segments)
    out = cudnn.dot_product_attention(
        q.reshape(b, t, kv * g, h),
        k,
        v,
        q_seqlen=seqlens,
        kv_seqlen=seqlens,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=h**-0.5,
        mask_type=cudnn.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return out.reshape(b, t, kv, g, h)


GPU_ONLY = ("cudnn", "pallas")
# ``auto`` on a GPU: the first of these that compiles and runs a small probe of the same dtype / head dim / group
# size. Fastest first: cuDNN's flash kernel beats our Triton-lowered one on H100 in published numbers; re-check with
# tools/bench_attention.py and reorder here if the measurement says otherwise.
AUTO_GPU_ORDER = ("cudnn", "pallas")

_KERNELS: dict[str, Callable[..., jax.Array]] = {  # (q, k, v, segment_ids, ...): xla's extra is dropout
    "xla": xla_attention,
    "cudnn": lambda q, k, v, seg, max_segments=64: cudnn_attention(q, k, v, seg, max_segments),
    "pallas": lambda q, k, v, seg, max_segments=64: flash_attention(q, k, v, seg),
}
_said: set[str] = set()


def _say_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


@functools.cache
def probe(impl: str, dtype: str, seq: int, kv_heads: int, groups: int, head_dim: int) -> str | None:
    """None if ``impl`` compiles and runs forward+backward on one packed row of the real shape here, else why not.

    The shape is the one training runs (``seq`` tokens, ``kv_heads`` x ``groups`` heads of ``head_dim``; batch 1,
    two documents): a kernel can pass a small probe and still have no plan for the real sequence length (cuDNN's
    engine selection depends on it), and then ``auto`` would pick it with no fallback. Cached per shape; runs
    eagerly even when called while a jit is being traced (``ensure_compile_time_eval``).
    """
    with jax.ensure_compile_time_eval():
        try:
            q = jnp.ones((1, seq, kv_heads, groups, head_dim), dtype)
            k = jnp.ones((1, seq, kv_heads, head_dim), dtype)
            seg = (jnp.arange(seq, dtype=jnp.int32) >= seq // 2).astype(jnp.int32)[None] + 1

            def loss(q, k, v):
                return _KERNELS[impl](q, k, v, seg).astype(jnp.float32).sum()

            jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, k))
        except Exception as e:  # any failure means "cannot run here"; the reason goes to the log
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None


# The platform attention is resolved for while lowering for a device this host does not have (``target_platform``).
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(backend: str) -> Iterator[None]:
    """Resolve ``attn_impl`` for ``backend`` (``"gpu"``) instead of JAX's default backend inside this block.

    For ahead-of-time lowering of the step for a GPU on a host without one (``tools/lower_step.py``, the CUDA
    lowering test). ``auto`` cannot probe a device that is not there, so it takes the first kernel of
    ``AUTO_GPU_ORDER`` and says so; on the real device the probe decides.
    """
    token = _target.set(backend)
    try:
        yield
    finally:
        _target.reset(token)


def resolve_impl(
    impl: str, q: jax.ShapeDtypeStruct | jax.Array, dropout: bool = False, backend: str | None = None
) -> str:
    """The kernel ``impl`` runs as for queries like ``q`` on ``backend`` (default: JAX's default backend).

    ``xla``/``cudnn``/``pallas`` are themselves, but the GPU kernels raise a ``ValueError`` naming ``xla`` on other
    backends (Pallas' interpreter would "work" on CPU at a speed no training run wants; the tests call
    ``flash_attention(..., interpret=True)`` directly). ``auto`` is ``xla`` off GPU or with attention dropout, else
    the first kernel of ``AUTO_GPU_ORDER`` whose ``probe`` passes at ``q``'s shape; every fallback is logged once,
    never silent.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={impl!r} is unknown; valid: {ATTN_IMPLS}")
    lowering_only = backend is None and _target.get() is not None
    backend = backend or _target.get() or jax.default_backend()
    if impl in GPU_ONLY and backend != "gpu":
        raise ValueError(
            f"model.attn_impl={impl!r} needs a GPU, but JAX's backend is {backend!r}: set model.attn_impl='xla' "
            "(or 'auto', which picks xla here)"
        )
    if impl != "auto":
        return impl
    if backend != "gpu":
        # Expected on CPU runs (tests, the demo), so not a warning.
        _say_once(f"attention impl 'auto': no flash kernel for backend {backend!r}, using 'xla'", logging.INFO)
        return "xla"
    if dropout:
        _say_once("attention impl 'auto': attention dropout is only implemented by 'xla', using 'xla'")
        return "xla"
    if lowering_only:
        _say_once(f"attention impl 'auto': lowering for {backend!r} without the device, {AUTO_GPU_ORDER[0]!r} unprobed")
        return AUTO_GPU_ORDER[0]
    _, seq, kv_heads, groups, head_dim = q.shape
    for name in AUTO_GPU_ORDER:
        why = probe(name, jnp.dtype(q.dtype).name, seq, kv_heads, groups, head_dim)
        if why is None:
            return name
        _say_once(f"attention impl 'auto': {name!r} cannot run here ({why}); trying the next kernel")
    _say_once(f"attention impl 'auto': none of {AUTO_GPU_ORDER} runs here, using 'xla'")
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    impl: str = "xla",
    dropout: tuple[float, jax.Array] | None = None,
    max_segments: int = 64,
) -> jax.Array:
    """Dispatches to the kernel named by ``model.attn_impl`` (resolved by ``resolve_impl``).

    Only ``xla`` takes attention dropout (keyed by our RNG); config validation keeps the others from seeing it.
    """
    impl = resolve_impl(impl, q, dropout is not None)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, dropout)
    if dropout is not None:
        raise ValueError(f"attention dropout needs attn_impl='xla', got {impl!r}")
    # Custom-call kernels run per shard: rows over the batch axes, kv heads over the head axis, whole sequences.
    kernel = functools.partial(_KERNELS[impl], max_segments=max_segments)
    row, heads = ("act_batch", None, "act_heads", None, None), ("act_batch", None, "act_heads", None)
    return per_shard(kernel, (row, heads, heads, ("act_batch", None)), row)(q, k, v, segment_ids)
