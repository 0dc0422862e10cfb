"""Flash attention (forward and backward) as Pallas kernels: causal, packed documents, GQA, fp32 accumulation.

Same contract as ``attention.xla_attention`` (its oracle in the tests): q [B, T, K, G, H], k/v [B, T, K, H],
``segment_ids`` [B, T]; query t reads key s iff ``s <= t`` and ``segment_ids[t] == segment_ids[s]``.

Lowering: Pallas -> Triton (``pl.pallas_call`` with a grid and BlockSpecs, ``jax.experimental.pallas.triton``
compiler params), not Mosaic GPU, the backend JAX now recommends for Hopper (the Triton backend warns that it is
deprecated from jax 0.11): the same source runs in ``interpret=True`` on CPU, so CI proves forward and backward
against the XLA reference (the Mosaic GPU interpreter cannot run a pipelined kernel of this shape: jax 0.10.2,
``run_state`` unsupported); its API is the same in jax 0.10.2 and 0.11.x while Mosaic GPU's still changes release to
release; it runs on Ampere as well as Hopper. The cost is speed: a Triton-lowered flash kernel is expected at ~55-60%
of cuDNN's on H100 (tokamax's tuned Triton kernel: 343 vs cuDNN's ~590 TFLOP/s causal forward; no wgmma warp
specialisation), not yet measured for this one (tools/bench_attention.py); packed rows claw part of that back by
skipping blocks, see below. A Mosaic GPU kernel is the upgrade path once it must beat cuDNN;
``attention.attention(impl="auto")`` tries kernels in the order of ``attention.AUTO_GPU_ORDER``.

Work skipping. Each kernel program owns one block of rows (queries, or keys for dK/dV) and loops over exactly the
blocks of the other side that can hold a visible pair: causally reachable and with overlapping segment-id ranges
(per-block min/max, computed in XLA before the kernels run, see ``_block_ranges``). For packed rows whose ids
increase along the row (what ``data/packing.py`` writes) the visited blocks are the ones a document touches, so the
work is ~ sum(L_i^2)/2 plus one block of slack per document edge instead of T^2/2. Blocks on the diagonal take the
causal mask; the others only the (cheap) segment mask. Ids that do not increase stay correct (the range test is
conservative), they just skip less.

Numerics: scores, softmax statistics and accumulators are fp32 whatever the input dtype; probabilities are cast
to the value dtype before the P.V product, as the XLA reference does. The forward saves the log-sum-exp (base 2)
for the backward, which recomputes probabilities blockwise (FlashAttention-2): dQ in one kernel, dK and dV in
another that walks the G query heads of its kv head, so repeated K/V are never materialised and dK/dV are summed
over the group in registers. A row that sees no key at all gets output 0, log-sum-exp +inf and zero gradients
(never NaN; ``xla_attention``'s finite mask value would give the mean of V instead). Through ``flash_attention``
neither case arises: every query sees itself, segment-0 padding included.

Shapes of any T and H work: T is padded to the block size (pad rows repeat the last segment id, so they never
widen a block's id range; the causal mask keeps real queries off the pad keys) and H to a power of two (zeros)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16) and Triton launch knobs; tune them on the GPU (tools/bench_attention.py).
    ``block_q``/``block_k`` tile the forward; ``block_q_bwd``/``block_k_bwd`` both backward kernels. ``num_warps``
    None picks 4 for head dims <= 64 and 8 above."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def clamp(self, t: int) -> BlockSizes:
        """Blocks no larger than the (power-of-two rounded) sequence, so short rows are not padded to 128."""
        cap = max(16, pl.next_power_of_2(t))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, cap),
            block_k=min(self.block_k, cap),
            block_q_bwd=min(self.block_q_bwd, cap),
            block_k_bwd=min(self.block_k_bwd, cap),
        )

    def check(self) -> None:
        """Raises a ValueError naming the first block size Triton cannot tile."""
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"BlockSizes.{name}={b}: blocks must be powers of two >= 16 (Triton tile rule)")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> jax.Array:
    """Causal, segment-masked GQA attention with the Pallas kernels; differentiable in q, k and v.

    Args:
      q: [B, T, K, G, H] queries, grouped by the kv head they read (query head n = k * G + g).
      k: [B, T, K, H] keys.
      v: [B, T, K, H] values.
      segment_ids: [B, T] int; equal ids attend to each other (causally).
      block_sizes: tiles and launch knobs.
      interpret: run the kernels with Pallas' interpreter (any backend, slow): what the CPU tests do.

    Returns:
      [B, T, K, G, H] in q's dtype.
    """
    b, t, kv, g, h = q.shape
    if k.shape != (b, t, kv, h) or v.shape != k.shape:
        raise ValueError(
            f"flash_attention: q {q.shape} needs k and v of shape {(b, t, kv, h)}, got {k.shape}, {v.shape}"
        )
    if segment_ids.shape != (b, t):
        raise ValueError(f"flash_attention: segment_ids {segment_ids.shape} must be {(b, t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    blocks = block_sizes.clamp(t)
    blocks.check()
    step = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    tp, hp = -(-t // step) * step, max(16, pl.next_power_of_2(h))
    seg = segment_ids.astype(jnp.int32)
    if tp != t:
        seg = jnp.pad(seg, ((0, 0), (0, tp - t)), mode="edge")
    qp, kp, vp = (_pad(x, tp, hp) for x in (q, k, v))
    out = _flash(qp, kp, vp, seg, h**-0.5, blocks, interpret)
    return out[:, :t, ..., :h]


def _pad(x: jax.Array, t: int, h: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[1], widths[-1] = (0, t - x.shape[1]), (0, h - x.shape[-1])
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _block_ranges(seg: jax.Array, bq: int, bk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Visit lists as ranges: ``(k_lo, k_hi)`` [B, nq] key blocks per query block, ``(q_lo, q_hi)`` [B, nk] back.

    A (query block, key block) pair is visited when it is causally reachable and the blocks' segment-id ranges
    overlap; each side then walks from its first to its last visited partner. The diagonal pair is always visited,
    so no range is empty.
    """
    b, t = seg.shape
    nq, nk = t // bq, t // bk
    qs, ks = seg.reshape(b, nq, bq), seg.reshape(b, nk, bk)
    qmin, qmax, kmin, kmax = qs.min(-1), qs.max(-1), ks.min(-1), ks.max(-1)
    reach = (jnp.arange(nk) * bk)[None, :] <= (jnp.arange(nq) * bq + bq - 1)[:, None]  # [nq, nk]
    pair = reach[None] & (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
    k_lo = jnp.argmax(pair, axis=2)
    k_hi = nk - jnp.argmax(pair[:, :, ::-1], axis=2)
    q_lo = jnp.argmax(pair, axis=1)
    q_hi = nq - jnp.argmax(pair[:, ::-1, :], axis=1)
    return k_lo.astype(jnp.int32), k_hi.astype(jnp.int32), q_lo.astype(jnp.int32), q_hi.astype(jnp.int32)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _params(blocks: BlockSizes, h: int) -> plgpu.CompilerParams:
    warps = blocks.num_warps if blocks.num_warps is not None else (4 if h <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


# ---------------------------------------------------------------------------------------------------------------
# Forward: one program per (b, kv head, group member, query block); loops over its key blocks.


def _fwd_kernel(k_lo_ref, k_hi_ref, seg_q_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bq, bk, nq, scale):
    i = nq - 1 - pl.program_id(3)  # the longest rows (late query blocks) launch first
    q = q_ref[...]
    seg_q = seg_q_ref[...]
    rows = i * bq + jnp.arange(bq)
    lo, hi = k_lo_ref[i], k_hi_ref[i]
    diag = _clip(lax.div(i * bq, bk), lo, hi)  # first key block that crosses the diagonal

    def body(j, carry, causal):
        acc, m, denom = carry
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        mask = seg_q[:, None] == seg_ref[ks][None, :]
        if causal:
            mask = mask & (rows[:, None] >= (j * bk + jnp.arange(bk))[None, :])
        s = jnp.where(mask, _dot_nt(q, k) * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: exp2(-inf) = 0, no NaN
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = lax.fori_loop(lo, diag, functools.partial(body, causal=False), carry)
    acc, m, denom = lax.fori_loop(diag, hi, functools.partial(body, causal=True), carry)
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(denom))


def _query_block_specs(t: int, nq: int, bq: int, h: int) -> list[pl.BlockSpec]:
    """Inputs of the kernels gridded over query blocks ``(b, kv, g, i)``, heaviest block first: the key-block range
    (lo, hi) per query block, this block's segment ids, all key segment ids, the q block, and all of k and v."""
    qblock = lambda bi, ki, gi, i: (bi, nq - 1 - i, ki, gi, 0)  # noqa: E731
    row = lambda bi, ki, gi, i: (bi, 0, ki, 0)  # noqa: E731
    return [
        pl.BlockSpec((None, nq), lambda bi, ki, gi, i: (bi, 0)),
        pl.BlockSpec((None, nq), lambda bi, ki, gi, i: (bi, 0)),
        pl.BlockSpec((None, bq), lambda bi, ki, gi, i: (bi, nq - 1 - i)),
        pl.BlockSpec((None, t), lambda bi, ki, gi, i: (bi, 0)),
        pl.BlockSpec((None, bq, None, None, h), qblock),
        pl.BlockSpec((None, t, None, h), row),
        pl.BlockSpec((None, t, None, h), row),
    ]


def _forward(q, k, v, seg, scale, blocks: BlockSizes, interpret: bool):
    b, t, kv, g, h = q.shape
    bq, bk = blocks.block_q, blocks.block_k
    nq = t // bq
    k_lo, k_hi, _, _ = _block_ranges(seg, bq, bk)
    kernel = functools.partial(_fwd_kernel, bq=bq, bk=bk, nq=nq, scale=scale * _LOG2E)
    qblock = lambda bi, ki, gi, i: (bi, nq - 1 - i, ki, gi, 0)  # noqa: E731
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, kv, g, nq),
        in_specs=_query_block_specs(t, nq, bq, h),
        out_specs=[
            pl.BlockSpec((None, bq, None, None, h), qblock),
            pl.BlockSpec((None, None, None, bq), lambda bi, ki, gi, i: (bi, ki, gi, nq - 1 - i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kv, g, t), jnp.float32),
        ],
        compiler_params=_params(blocks, h),
        interpret=interpret,
        name="flash_attention_fwd",
    )(k_lo, k_hi, seg, seg, q, k, v)
    return out, lse


# ---------------------------------------------------------------------------------------------------------------
# Backward, dQ: one program per query block, like the forward.


def _dq_kernel(
    k_lo_ref, k_hi_ref, seg_q_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, bq, bk, nq, scale,
):  # fmt: skip
    i = nq - 1 - pl.program_id(3)
    q, do = q_ref[...], do_ref[...]
    seg_q, lse, delta = seg_q_ref[...], lse_ref[...], delta_ref[...]
    rows = i * bq + jnp.arange(bq)
    lo, hi = k_lo_ref[i], k_hi_ref[i]
    diag = _clip(lax.div(i * bq, bk), lo, hi)

    def body(j, dq, causal):
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        mask = seg_q[:, None] == seg_ref[ks][None, :]
        if causal:
            mask = mask & (rows[:, None] >= (j * bk + jnp.arange(bk))[None, :])
        p = jnp.exp2(jnp.where(mask, _dot_nt(q, k) * scale, -jnp.inf) - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(lo, diag, functools.partial(body, causal=False), dq)
    dq = lax.fori_loop(diag, hi, functools.partial(body, causal=True), dq)
    dq_ref[...] = (dq * (scale / _LOG2E)).astype(dq_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Backward, dK and dV: one program per (b, kv head, key block); walks every (group member, query block) pair that
# can see the block, so the G query heads' contributions are summed in registers.


def _dkv_kernel(
    q_lo_ref, q_hi_ref, seg_k_ref, seg_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, bq, bk, groups, scale,
):  # fmt: skip
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    seg_k = seg_k_ref[...]
    cols = j * bk + jnp.arange(bk)
    lo, hi = q_lo_ref[j], q_hi_ref[j]
    full = _clip(lax.div(j * bk + bk - 1 + bq - 1, bq), lo, hi)  # first query block entirely below the diagonal

    def body(step, carry, start, count, causal):
        dk, dv = carry
        gi, i = lax.div(step, count), start + lax.rem(step, count)
        qs = pl.ds(i * bq, bq)
        q, do = q_ref[qs, gi, :], do_ref[qs, gi, :]
        lse, delta = lse_ref[gi, qs], delta_ref[gi, qs]
        # Transposed tiles ([keys, queries]) so every product below is a plain or NT matmul.
        mask = seg_k[:, None] == seg_ref[qs][None, :]
        if causal:
            mask = mask & (cols[:, None] <= (i * bq + jnp.arange(bq))[None, :])
        pt = jnp.exp2(jnp.where(mask, _dot_nt(k, q) * scale, -jnp.inf) - lse[None, :])
        dv = dv + _dot(pt.astype(do.dtype), do)
        dst = pt * (_dot_nt(v, do) - delta[None, :])
        dk = dk + _dot(dst.astype(q.dtype), q)
        return dk, dv

    def walk(start, stop, carry, causal):
        count = stop - start
        fn = functools.partial(body, start=start, count=jnp.maximum(count, 1), causal=causal)
        return lax.fori_loop(0, groups * count, fn, carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = walk(lo, full, carry, causal=True)
    dk, dv = walk(full, hi, carry, causal=False)
    dk_ref[...] = (dk * (scale / _LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, seg, out, lse, do, scale, blocks: BlockSizes, interpret: bool):
    b, t, kv, g, h = q.shape
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    nq, nk = t // bq, t // bk
    k_lo, k_hi, q_lo, q_hi = _block_ranges(seg, bq, bk)
    # delta_t = sum_h o * do (the softmax-backward row term), fp32, laid out like the lse: [B, K, G, T].
    # An elementwise product and a row sum (one XLA fusion), not an einsum that could become a batched matvec.
    delta = jnp.transpose((out.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1), (0, 2, 3, 1))
    scale2 = scale * _LOG2E
    params = _params(blocks, h)

    qblock = lambda bi, ki, gi, i: (bi, nq - 1 - i, ki, gi, 0)  # noqa: E731
    stat = lambda bi, ki, gi, i: (bi, ki, gi, nq - 1 - i)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, nq=nq, scale=scale2),
        grid=(b, kv, g, nq),
        in_specs=[
            *_query_block_specs(t, nq, bq, h),
            pl.BlockSpec((None, bq, None, None, h), qblock),
            pl.BlockSpec((None, None, None, bq), stat),
            pl.BlockSpec((None, None, None, bq), stat),
        ],
        out_specs=pl.BlockSpec((None, bq, None, None, h), qblock),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(k_lo, k_hi, seg, seg, q, k, v, do, lse, delta)

    kblock = lambda bi, ki, j: (bi, j, ki, 0)  # noqa: E731
    qrow = lambda bi, ki, j: (bi, 0, ki, 0, 0)  # noqa: E731
    statrow = lambda bi, ki, j: (bi, ki, 0, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, bk=bk, groups=g, scale=scale2),
        grid=(b, kv, nk),
        in_specs=[
            pl.BlockSpec((None, nk), lambda bi, ki, j: (bi, 0)),
            pl.BlockSpec((None, nk), lambda bi, ki, j: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, ki, j: (bi, j)),
            pl.BlockSpec((None, t), lambda bi, ki, j: (bi, 0)),
            pl.BlockSpec((None, bk, None, h), kblock),
            pl.BlockSpec((None, bk, None, h), kblock),
            pl.BlockSpec((None, t, None, g, h), qrow),
            pl.BlockSpec((None, t, None, g, h), qrow),
            pl.BlockSpec((None, None, g, t), statrow),
            pl.BlockSpec((None, None, g, t), statrow),
        ],
        out_specs=[pl.BlockSpec((None, bk, None, h), kblock), pl.BlockSpec((None, bk, None, h), kblock)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(q_lo, q_hi, seg, seg, k, v, q, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, scale: float, blocks: BlockSizes, interpret: bool):
    return _forward(q, k, v, seg, scale, blocks, interpret)[0]


def _flash_fwd(q, k, v, seg, scale, blocks, interpret):
    out, lse = _forward(q, k, v, seg, scale, blocks, interpret)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, blocks, interpret, residuals, do):
    q, k, v, seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, out, lse, do, scale, blocks, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
