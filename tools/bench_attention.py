"""Time the attention kernels (xla, cudnn, pallas) forward and forward+backward on causal and packed rows.

    python tools/bench_attention.py [--batch 4 --seq 4096 --heads 16 --kv-heads 8 --head-dim 128 --dtype bfloat16]
        [--impls xla,cudnn,pallas,mosaic] [--cases causal,packed] [--doc-len 256:2048]
        [--pallas-blocks 128,64,64,64 64,64,64,64,8,3 ...] [--iters 20 --warmup 3] [--json OUT.json]

Meant for a GPU (the defaults are InternLM2-1.8B's attention at micro_bsz 4, seq_len 4096). On CPU it only makes
sense as a harness check with tiny shapes and ``--interpret`` (Pallas' interpreter). Each kernel is first checked
against the XLA reference in fp32 on the same inputs (output and dq/dk/dv; max error relative to max, bound 2e-2 for
16-bit inputs, 1e-4 for fp32); a kernel that fails to compile or run is reported, not fatal. Times are the median
wall-clock of ``--iters`` calls of a jitted function to ``block_until_ready`` after ``--warmup`` calls.

TFLOP/s use full-row causal FLOPs, the convention MFU uses: forward 2 matmuls x 2 x B x Hq x S^2/2 x D, forward +
backward 3.5x that. ``packed`` rows (documents of random lengths from ``--doc-len``, the same layout for every
kernel) also get a "useful" rate that counts only the document-diagonal work (sum of L_i^2 instead of S^2), the
work a kernel that skips masked blocks can save.

``mosaic`` is JAX's own Hopper flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``, Mosaic GPU:
wgmma, TMA, warp specialisation), causal rows only (it takes no document mask), 16-bit inputs, head dim a multiple
of 64: the yardstick for what a Pallas kernel can reach on Hopper.

A ``--pallas-blocks`` spec is ``BQ,BK,BQ_BWD,BK_BWD[,WARPS[,STAGES]]``; each spec is its own row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from internevo_jax.ops.attention import cudnn_attention, xla_attention
from internevo_jax.ops.flash_attention import BlockSizes, flash_attention

PEAK_BF16 = 989.4  # H100/H200 SXM dense bf16 TFLOP/s (metrics.PEAK_TFLOPS)


def packed_segments(batch: int, seq: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """[B, S] ids 1, 2, ... of documents with lengths uniform in [lo, hi] (the last one cut at the row end)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(rng.integers(lo, hi + 1)))
        rows.append(np.repeat(np.arange(1, len(lengths) + 1), lengths)[:seq])
    return np.stack(rows).astype(np.int32)


def useful_fraction(seg: np.ndarray) -> float:
    """sum_i L_i^2 / S^2 averaged over rows: the share of causal work inside documents."""
    fr = []
    for row in seg:
        _, counts = np.unique(row, return_counts=True)
        fr.append(float((counts.astype(np.float64) ** 2).sum()) / len(row) ** 2)
    return float(np.mean(fr))


def parse_blocks(spec: str) -> BlockSizes:
    parts = [int(p) for p in spec.split(",")]
    if not 4 <= len(parts) <= 6:
        raise argparse.ArgumentTypeError(f"--pallas-blocks {spec!r}: want BQ,BK,BQ_BWD,BK_BWD[,WARPS[,STAGES]]")
    warps = parts[4] if len(parts) > 4 else None
    stages = parts[5] if len(parts) > 5 else 2
    return BlockSizes(*parts[:4], num_warps=warps, num_stages=stages)


def kernels(args, max_segments: int) -> dict:
    """name -> fn(q, k, v, seg) for every requested implementation (pallas: one per block spec)."""
    out = {}
    for impl in args.impls:
        if impl == "xla":
            out["xla"] = xla_attention
        elif impl == "cudnn":
            out["cudnn"] = lambda q, k, v, s: cudnn_attention(q, k, v, s, max_segments)
        elif impl == "mosaic":
            out["mosaic"] = mosaic_attention
        elif impl == "pallas":
            for spec in args.pallas_blocks:
                blocks = parse_blocks(spec)
                out[f"pallas[{spec}]"] = lambda q, k, v, s, b=blocks: flash_attention(
                    q, k, v, s, block_sizes=b, interpret=args.interpret
                )
        else:
            raise SystemExit(f"unknown impl {impl!r}: xla | cudnn | pallas | mosaic")
    return out


def mosaic_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    """JAX's Mosaic GPU attention on our [B, T, K, G, H] layout, causal (``seg`` is ignored: causal rows only)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    b, t, kv, g, h = q.shape
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    return attention_mgpu.attention(q.reshape(b, t, kv * g, h), k, v, config).reshape(b, t, kv, g, h)


def timed(fn, inputs, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def reference(q, k, v, w, seg) -> tuple[jax.Array, ...]:
    """(out, dq, dk, dv) of the XLA kernel in fp32 on the same inputs.

    Full fp32 matmuls: on a GPU JAX's default precision lets float32 dots run as TF32 (~1e-3 relative), which would
    make the oracle itself the least precise party.
    """
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        out = jax.jit(xla_attention)(*f32, seg)
        grads = jax.jit(jax.grad(lambda q, k, v, s: (xla_attention(q, k, v, s) * w).sum(), (0, 1, 2)))(*f32, seg)
    return (out, *grads)


def bench_case(name: str, fn, q, k, v, w, seg, ref, args) -> dict:
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg))
    grad = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v, seg).astype(jnp.float32) * w).sum(), (0, 1, 2)))
    row = dict(impl=name)
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(q, k, v))
        grads = jax.block_until_ready(grad(q, k, v))
        row["compile_and_first_run_s"] = time.perf_counter() - t0
    except Exception as e:  # a kernel that cannot run here is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return row
    errs = [rel_err(x, y) for x, y in zip((out, *grads), ref, strict=True)]
    row["max_rel_err"] = max(errs)
    bound = 1e-4 if q.dtype == jnp.float32 else 2e-2
    row["correct"] = row["max_rel_err"] <= bound
    row["fwd_ms"] = timed(fwd, (q, k, v), args.warmup, args.iters) * 1e3
    row["fwd_bwd_ms"] = timed(grad, (q, k, v), args.warmup, args.iters) * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--impls", type=lambda s: s.split(","), default=["xla", "cudnn", "pallas", "mosaic"])
    p.add_argument("--cases", type=lambda s: s.split(","), default=["causal", "packed"])
    p.add_argument("--doc-len", default="256:2048", help="packed: document lengths lo:hi, uniform")
    p.add_argument("--pallas-blocks", nargs="+", default=["128,64,64,64"], help="one row per spec (see above)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU harness check only)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")

    b, s, kv, g, h = args.batch, args.seq, args.kv_heads, args.heads // args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(args.seed), 4)
    q = jax.random.normal(keys[0], (b, s, kv, g, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kv, h), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[3], (b, s, kv, g, h), jnp.float32)
    lo, hi = (int(x) for x in args.doc_len.split(":"))
    fwd_flops = 2 * 2 * b * args.heads * s * s / 2 * h
    device = jax.devices()[0]
    try:
        from jax._src.lib import cuda_versions

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:
        cudnn = None
    header = dict(
        date=datetime.now().strftime("%Y-%m-%d %H:%M"),
        device=device.device_kind,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        cudnn=cudnn,
        shape=dict(batch=b, seq=s, heads=args.heads, kv_heads=kv, head_dim=h, dtype=args.dtype),
    )
    results = []
    for case in args.cases:
        if case == "causal":
            seg = np.ones((b, s), np.int32)
        elif case == "packed":
            seg = packed_segments(b, s, lo, hi, args.seed)
        else:
            raise SystemExit(f"unknown case {case!r}: causal | packed")
        useful = useful_fraction(seg)
        most = int((np.diff(seg, axis=1) != 0).sum(axis=1).max()) + 1
        seg = jnp.asarray(seg)
        ref = reference(q, k, v, w, seg)
        for name, fn in kernels(args, most).items():
            if name == "mosaic" and case != "causal":
                row = dict(impl=name, error="no document mask: causal rows only")
            else:
                row = bench_case(name, fn, q, k, v, w, seg, ref, args)
            row.update(case=case, useful_fraction=useful, segments_max=most)
            if "fwd_ms" in row:
                row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
                row["fwd_bwd_useful_tflops"] = row["fwd_bwd_tflops"] * useful
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(table(header, results))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, results=results), indent=2) + "\n")
    return 0


def table(header: dict, results: list[dict]) -> str:
    lines = [
        f"{header['date']} | {header['device']} | jax {header['jax']} / jaxlib {header['jaxlib']} | cudnn "
        f"{header['cudnn']} | {header['shape']}",
        "",
        "| case | impl | correct (err) | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | useful fwd+bwd TFLOP/s "
        "| vs cudnn fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        base = [x for x in results if x["case"] == r["case"] and x["impl"] == "cudnn" and "fwd_bwd_ms" in x]
        ratio = f"{base[0]['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if base else "n/a"
        lines.append(
            f"| {r['case']} | {r['impl']} | {'yes' if r['correct'] else 'NO'} ({r['max_rel_err']:.1e}) "
            f"| {r['fwd_ms']:.3f} | {r['fwd_tflops']:.3g} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.3g} "
            f"| {r['fwd_bwd_useful_tflops']:.3g} | {ratio} |"
        )
    lines.append(f"\nTFLOP/s: full-row causal FLOPs (MFU convention); peak bf16 {PEAK_BF16} on H100/H200.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
