"""Every GPU check in one command, in stages with their own deadlines, writing results as it goes.

    python tools/gpu_check.py --out DIR [--budget 470] [--stages env,correct,attention,train,peer[,moe]] [--dry-run]

Made for a lent GPU with minutes of device time: one call runs everything, most important first, and a run cut
short still leaves what it measured. Each stage runs in its own Python process with its own deadline (a hung
compile or a crashed kernel costs that stage, not the rest), writes ``DIR/<stage>.json``, appends its output to
``DIR/gpu_check.log``; after every stage ``DIR/summary.md`` is rewritten (7 files in all: what the device tool
brings back). XLA's persistent compilation cache (``--cache``) is on, so a rerun skips the compiles.

Stages:
  env        device, driver, clocks (nvidia-smi), jax/jaxlib/CUDA/cuDNN/torch/flax/optax/orbax/triton versions, and
             the measured bf16 matmul ceiling (8192^3, the MFU yardstick of the chip as found).
  correct    pallas and cudnn attention vs the fp32 XLA oracle (output and dq/dk/dv; causal and packed rows, GQA,
             bf16 and fp32 inputs), then 3 training steps of a tiny bf16 model under attn_impl xla / cudnn /
             pallas, whose losses must agree with xla's.
  attention  tools/bench_attention.py at B4 S4096 H16 D128: xla, cudnn, pallas (several tile specs) and JAX's
             Mosaic GPU kernel, forward and forward+backward TFLOP/s, causal rows and packed rows (docs 256-1024).
  train      tools/benchmark.py on configs/internlm2_1_8b.py at seq_len 4096 with attn_impl auto: the preset,
             without remat, and micro_bsz 4 x micro_num 1 (tokens/s, MFU, step time, compile time, peak memory).
  peer       tools/bench_torch_peer.py --compile on the same shape (the PyTorch + transformers peer).
  moe        (optional: only when named in --stages) 8 layers of the 1.8B preset dense (FFN 4 x hidden) against
             MIXTRALMOE with 8 experts of 2 x hidden, top-2 (the same active FFN), capacity and dropless paths.

``--dry-run`` runs every stage on the CPU at tiny shapes (Pallas interpreted, cuDNN reported as not runnable), as
the test suite does, so this script cannot rot between GPU sessions. The command for a lent GPU is in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"

# Stage -> deadline in seconds on the GPU (the sum stays under the 8 minutes a lent GPU call can afford).
STAGES = {"env": 30, "correct": 90, "attention": 100, "train": 170, "peer": 100}
OPTIONAL_STAGES = {"moe": 120}  # run only when named in --stages (the default set fits the 8 minutes without it)
DRY_RUN_SLACK = 4
# Bounds of the kernel checks (max |err| / max |ref| against the fp32 oracle): fp32 inputs run as TF32 on the
# tensor cores (XLA's own default for float32 dots on GPU), 16-bit inputs round P and dO to bf16.
KERNEL_BOUND = {"float32": 2e-3, "bfloat16": 2e-2}
# Losses of 3 training steps under another attention kernel vs xla: bf16 activations, different summation orders.
LOSS_BOUND = 1e-2  # relative


# ---------------------------------------------------------------------------------------------------------------
# The driver: one subprocess per stage, a deadline each, results written as they come.


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--stages", type=lambda s: s.split(","), default=list(STAGES), help="comma-separated subset")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages together (default 480)")
    p.add_argument(
        "--deadline",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="a stage's own deadline in seconds, replacing the default (repeatable; not scaled by --dry-run)",
    )
    p.add_argument("--cache", default="/tmp/internevo_jax_xla_cache", help="persistent XLA compilation cache")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Pallas interpreted")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.stage:
        return run_stage(args.stage, out, args.dry_run)
    unknown = [s for s in args.stages if s not in STAGES | OPTIONAL_STAGES]
    if unknown:
        p.error(f"--stages: unknown {unknown}; valid: {','.join(STAGES | OPTIONAL_STAGES)}")
    try:
        own = {k: float(v) for k, v in (d.split("=", 1) for d in args.deadline)}
    except ValueError:
        p.error(f"--deadline: expected STAGE=SECONDS, got {args.deadline}")
    if set(own) - set(STAGES | OPTIONAL_STAGES) or any(v <= 0 for v in own.values()):
        p.error(f"--deadline: {args.deadline}; stages are {','.join(STAGES | OPTIONAL_STAGES)}, seconds positive")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=args.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    # The deadlines are sized for the GPU; a dry run on a busy 2-core CPU (the test suite) gets DRY_RUN_SLACK times.
    scale = DRY_RUN_SLACK if args.dry_run else 1
    budget = args.budget if args.budget is not None else 480.0 * scale
    start = time.monotonic()
    summary: dict[str, dict] = {}
    for stage in args.stages:
        left = budget - (time.monotonic() - start)
        deadline = min(own.get(stage, (STAGES | OPTIONAL_STAGES)[stage] * scale), left)
        if left < 5:
            summary[stage] = dict(status="not run: budget spent", seconds=0.0)
            write_summary(out, summary, args.dry_run)
            continue
        summary[stage] = run_child(stage, out, deadline, env, args.dry_run)
        write_summary(out, summary, args.dry_run)
        print(f"[gpu_check] {stage}: {summary[stage]['status']} ({summary[stage]['seconds']:.0f} s)", flush=True)
    print((out / "summary.md").read_text(), flush=True)
    return 0 if all(s["status"] == "ok" for s in summary.values()) else 1


def run_child(stage: str, out: Path, deadline: float, env: dict, dry_run: bool) -> dict:
    """Runs one stage in a fresh process, killed at ``deadline``; its status and what it wrote."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--stage", stage]
    cmd += ["--dry-run"] if dry_run else []
    t0 = time.monotonic()
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"\n===== {stage} {datetime.now():%Y-%m-%d %H:%M:%S} (deadline {deadline:.0f} s) =====\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=deadline).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc}, see gpu_check.log)"
        except subprocess.TimeoutExpired:
            status = f"cut at its {deadline:.0f} s deadline (partial results kept)"
    return dict(status=status, seconds=time.monotonic() - t0)


def write_summary(out: Path, summary: dict[str, dict], dry_run: bool) -> None:
    """``summary.md``: one table of the stages, then each stage's own lines from its JSON (rewritten atomically)."""
    lines = [
        f"# gpu_check {datetime.now():%Y-%m-%d %H:%M}{' (dry run, CPU)' if dry_run else ''}",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['status']} | {s['seconds']:.0f} |" for name, s in summary.items()]
    for name in summary:
        path = out / f"{name}.json"
        if path.exists():
            lines += ["", f"## {name}", "", *json.loads(path.read_text()).get("markdown", [])]
    tmp = out / ".summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "summary.md")


class Results:
    """A stage's JSON file, rewritten after every row so a stage cut at its deadline keeps what it measured."""

    def __init__(self, out: Path, stage: str):
        self.path, self.data = out / f"{stage}.json", {"stage": stage, "rows": [], "markdown": []}

    def add(self, row: dict, line: str | None = None) -> None:
        self.data["rows"].append(row)
        if line is not None:
            self.data["markdown"].append(line)
        self.save()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)
        print(json.dumps(self.data["rows"][-1] if self.data["rows"] else self.data, default=str), flush=True)


def run_stage(stage: str, out: Path, dry_run: bool) -> int:
    sys.path[:0] = [str(ROOT), str(TOOLS)]
    results = Results(out, stage)
    stages = dict(env=stage_env, correct=stage_correct, attention=stage_attention, train=stage_train, moe=stage_moe)
    return stages.get(stage, stage_peer)(results, dry_run)


# ---------------------------------------------------------------------------------------------------------------
# Stages. Each returns an exit code: 0 when everything it checked passed.


def stage_env(results: Results, dry_run: bool) -> int:
    import jax
    import jax.numpy as jnp

    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "grain", "ml-collections", "triton", "torch", "transformers", "numpy"):  # fmt: skip
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from jax._src.lib import cuda_versions

        cuda = None if cuda_versions is None else dict(
            runtime=cuda_versions.cuda_runtime_get_version(), cudnn=cuda_versions.cudnn_get_version()
        )  # fmt: skip
    except Exception as e:  # a CPU jaxlib, or the helpers moved: report, do not stop the stage
        cuda = f"unavailable: {type(e).__name__}: {e}"
    smi = None
    if shutil.which("nvidia-smi"):
        query = (
            "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.total"
        )
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
        smi = r.stdout.strip() or r.stderr.strip()
    device = jax.devices()[0]
    n = 512 if dry_run else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(3 if dry_run else 10):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    tflops = 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
    row = dict(
        device_kind=device.device_kind,
        platform=device.platform,
        device_count=jax.device_count(),
        versions=versions,
        cuda=cuda,
        nvidia_smi=smi,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        matmul_bf16=dict(n=n, tflops=tflops),
    )
    lines = [
        f"- device: {jax.device_count()}x {device.device_kind} ({device.platform}); CUDA/cuDNN: {cuda}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- bf16 matmul {n}^3: {tflops:.1f} TFLOP/s (median of {len(times)})",
    ]
    if smi:
        lines += ["- nvidia-smi: " + " / ".join(smi.splitlines())]
    results.add(row)
    results.set(markdown=lines)
    return 0


def stage_correct(results: Results, dry_run: bool) -> int:
    """Kernels against the oracle, then 3 training steps per attention kernel."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_attention import packed_segments, reference

    kernels = _kernels(dry_run)
    b, s, kv, g, h = (1, 128, 2, 2, 32) if dry_run else (2, 2048, 4, 4, 128)
    ok = True
    results.data["markdown"] += [
        f"Kernels vs the fp32 XLA oracle, B{b} S{s} {kv * g}q/{kv}kv heads D{h}; bound {KERNEL_BOUND}:",
        "",
        "| case | dtype | impl | max rel err (out, dq, dk, dv) | pass |",
        "|---|---|---|---|---|",
    ]
    keys = jax.random.split(jax.random.key(0), 4)
    for case in ("causal", "packed"):
        seg = np.ones((b, s), np.int32) if case == "causal" else packed_segments(b, s, s // 8, s // 3, 0)
        seg = jnp.asarray(seg)
        for dtype in ("bfloat16", "float32"):
            q = jax.random.normal(keys[0], (b, s, kv, g, h), jnp.float32).astype(dtype)
            k = jax.random.normal(keys[1], (b, s, kv, h), jnp.float32).astype(dtype)
            v = jax.random.normal(keys[2], (b, s, kv, h), jnp.float32).astype(dtype)
            w = jax.random.normal(keys[3], (b, s, kv, g, h), jnp.float32)
            ref = reference(q, k, v, w, seg)
            for impl, fn in kernels.items():
                row = dict(check="kernel", case=case, dtype=dtype, impl=impl)
                if impl == "cudnn" and dtype == "float32":
                    row["skipped"] = "cuDNN flash attention takes 16-bit inputs only"
                    results.add(row, f"| {case} | {dtype} | {impl} | n/a: {row['skipped']} | - |")
                    continue
                row.update(_check_kernel(fn, (q, k, v), w, seg, ref, KERNEL_BOUND[dtype]))
                ok &= row["passed"]
                cell = ", ".join(f"{x:.1e}" for x in row["errors"]) if "errors" in row else row["error"]
                results.add(row, f"| {case} | {dtype} | {impl} | {cell} | {'yes' if row['passed'] else 'NO'} |")
    ok &= _train_losses_agree(results, kernels, dry_run)
    return 0 if ok else 1


def _check_kernel(fn, qkv: tuple, w, seg, ref: tuple, bound: float) -> dict:
    """Output and dq/dk/dv of ``fn`` vs the oracle: ``errors`` and ``passed``, or ``error`` if it cannot run."""
    import jax
    import jax.numpy as jnp
    from bench_attention import rel_err

    def loss(q, k, v):
        return (fn(q, k, v, seg).astype(jnp.float32) * w).sum()

    try:
        out = jax.jit(lambda q, k, v: fn(q, k, v, seg))(*qkv)
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(*qkv)
    except Exception as e:  # a kernel that cannot run is a result of this check
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", passed=False)
    errs = [rel_err(x, y) for x, y in zip((out, *grads), ref, strict=True)]
    return dict(errors=errs, passed=max(errs) <= bound)


def _kernels(dry_run: bool) -> dict:
    """The kernels checked: both on a GPU; on a CPU dry run only Pallas, interpreted (cuDNN has no CPU path)."""
    import functools

    from internevo_jax.ops.attention import cudnn_attention
    from internevo_jax.ops.flash_attention import flash_attention

    if dry_run:
        return {"pallas": functools.partial(flash_attention, interpret=True)}
    return {"pallas": flash_attention, "cudnn": lambda q, k, v, seg: cudnn_attention(q, k, v, seg, 64)}


def _train_losses_agree(results: Results, kernels: dict, dry_run: bool) -> bool:
    """3 steps of a tiny bf16 InternLM2 (head dim 64) per attn_impl; the losses must match xla's (LOSS_BOUND)."""
    import contextlib
    import tempfile
    from unittest import mock

    import benchmark

    from internevo_jax import config as config_lib
    from internevo_jax.ops import attention

    size = ["--config.model.hidden_size=256", "--config.model.num_attention_heads=4", "--config.data.seq_len=256"]
    size += ["--config.model.dtype=torch.bfloat16", "--config.data.micro_bsz=2", "--config.model.num_layers=2"]
    results.data["markdown"] += ["", f"3 training steps of `configs/tiny.py` at {' '.join(size)}:", ""]
    results.data["markdown"] += ["| attn_impl | losses | max rel diff vs xla | pass |", "|---|---|---|---|"]
    losses, ok = {}, True
    for impl in ("xla", *kernels):
        row = dict(check="train", impl=impl)
        with contextlib.ExitStack() as stack:
            if dry_run and impl != "xla":
                # CPU: resolve for a GPU and run the interpreted kernels, as the GPU would run the compiled ones.
                stack.enter_context(attention.target_platform("gpu"))
                stack.enter_context(mock.patch.dict(attention._KERNELS, {impl: _cpu_kernel(kernels[impl])}))
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
            try:
                overrides = [*size, f"--config.model.attn_impl={impl}", *benchmark.forced_overrides(tmp, 3)]
                cfg = config_lib.load(ROOT / "configs" / "tiny.py", overrides)
                losses[impl] = benchmark.run(cfg, steps=3, warmup=0, config_path="configs/tiny.py")["losses"]
                row["losses"] = losses[impl]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if "losses" in row:
            diff = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], losses["xla"], strict=True))
            row.update(max_rel_diff=diff, passed=diff <= LOSS_BOUND)
            cell = ", ".join(f"{x:.5f}" for x in row["losses"])
        else:
            row["passed"], cell, diff = False, row["error"], float("nan")
        ok &= row["passed"]
        results.add(row, f"| {impl} | {cell} | {diff:.1e} | {'yes' if row['passed'] else 'NO'} |")
    return ok


def _cpu_kernel(fn):
    return lambda q, k, v, seg, max_segments=64: fn(q, k, v, seg)


def stage_attention(results: Results, dry_run: bool) -> int:
    import bench_attention

    if dry_run:
        shape = ["--batch", "1", "--seq", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32"]
        rest = ["--impls", "xla,pallas", "--interpret", "--iters", "1", "--warmup", "0", "--doc-len", "16:48"]
        rest += ["--pallas-blocks", "32,32,32,32"]
    else:
        shape = ["--batch", "4", "--seq", "4096", "--heads", "16", "--kv-heads", "16", "--head-dim", "128"]
        rest = ["--impls", "cudnn,pallas,mosaic,xla", "--iters", "10", "--warmup", "2", "--doc-len", "256:1024"]
        rest += ["--pallas-blocks", "128,64,64,64", "128,128,64,64,8,3", "64,64,64,64,4,2"]
    path = results.path.with_name("attention_bench.tmp.json")
    rc = bench_attention.main([*shape, *rest, "--json", str(path)])
    data = json.loads(path.read_text())
    path.unlink()
    table = bench_attention.table(data["header"], data["results"])
    results.set(header=data["header"], rows=data["results"], markdown=table.splitlines())
    # JAX's Mosaic kernel is a yardstick, not ours: its failing to run is reported but does not fail the stage.
    failed = [r["impl"] for r in data["results"] if not r.get("correct") and r["impl"] != "mosaic"]
    return rc or int(bool(failed))


def stage_train(results: Results, dry_run: bool) -> int:
    """tools/benchmark.py per variant of the 1.8B preset (tiny.py in a dry run): attention, remat, batch shape."""
    if dry_run:
        config, common = "configs/tiny.py", ["--steps", "2", "--warmup", "1"]
    else:
        config, common = "configs/internlm2_1_8b.py", ["--steps", "4", "--warmup", "2", "--config.data.seq_len=4096"]
    variants = {
        "preset (auto attention)": [],
        "no remat": ["--config.model.checkpoint=False"],
        "micro_bsz 4 x micro_num 1": ["--config.data.micro_bsz=4", "--config.data.micro_num=1"],
    }
    return benchmark_variants(results, config, [*common, "--config.model.attn_impl=auto"], variants)


def stage_moe(results: Results, dry_run: bool) -> int:
    """Optional (``--stages ...,moe``): a dense model against MIXTRALMOE with the same active FFN width (8 experts of
    half the width, top-2), on the capacity (GShard) and the dropless (``ragged_dot``) paths."""
    if dry_run:
        config, common = "configs/tiny.py", ["--steps", "2", "--warmup", "1", "--config.model.multiple_of=16"]
    else:  # the 1.8B preset's layers, 8 of them: ~2.2B parameters with the experts, Adam state within one H100
        config = "configs/internlm2_1_8b.py"
        common = ["--steps", "4", "--warmup", "2", "--config.data.seq_len=4096", "--config.model.num_layers=8"]
    moe = ["--config.model_type=MIXTRALMOE", "--config.model.num_experts=8", "--config.moe.top_k=2"]
    variants = {
        "dense, FFN 4 x hidden": ["--config.model.mlp_ratio=4"],
        "MoE 8 x (2 x hidden), top-2, capacity": [*moe, "--config.model.mlp_ratio=2"],
        "MoE 8 x (2 x hidden), top-2, dropless": [
            *moe,
            "--config.model.mlp_ratio=2",
            "--config.model.moe_type=MegaBlock-D",
        ],
    }
    return benchmark_variants(results, config, [*common, "--config.model.attn_impl=auto"], variants)


def benchmark_variants(results: Results, config: str, common: list[str], variants: dict[str, list[str]]) -> int:
    """tools/benchmark.py once per variant, each in its own process (a variant that runs out of memory is a result)."""
    import benchmark

    ok = True
    for name, extra in variants.items():
        path = results.path.with_name(f"{results.path.stem}_variant.tmp.json")
        cmd = [sys.executable, str(TOOLS / "benchmark.py"), f"--config={config}", *common, *extra]
        r = subprocess.run([*cmd, "--json", str(path)], capture_output=True, text=True, cwd=ROOT)
        print(r.stdout[-4000:], r.stderr[-4000:], flush=True)
        if r.returncode == 0 and path.exists():
            row = dict(variant=name, overrides=extra, **json.loads(path.read_text()))
            path.unlink()
            table = benchmark.table(row).splitlines()
            if not results.data["markdown"]:
                results.data["markdown"] += [
                    "| variant " + table[0],
                    "|---" + table[1],
                ]
            results.add(row, f"| {name} " + table[2])
        else:
            ok = False
            why = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
            results.add(dict(variant=name, overrides=extra, error=why), f"| {name} | failed: {why} |")
    return 0 if ok else 1


def stage_peer(results: Results, dry_run: bool) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        results.add(dict(skipped="torch is not installed"), "skipped: torch is not installed")
        return 0
    if dry_run:
        cmd = ["--config=configs/tiny.py", "--steps", "2", "--warmup", "1"]
    else:
        cmd = ["--config=configs/internlm2_1_8b.py", "--config.data.seq_len=4096", "--compile"]
        cmd += ["--steps", "4", "--warmup", "2", "--attn", "sdpa"]
    path = results.path.with_name("peer.tmp.json")
    r = subprocess.run([sys.executable, str(TOOLS / "bench_torch_peer.py"), *cmd, "--json", str(path)],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    print(r.stdout[-4000:], r.stderr[-4000:], flush=True)
    if r.returncode != 0 or not path.exists():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        results.add(dict(error=why), f"failed: {why}")
        return 1
    row = json.loads(path.read_text())
    path.unlink()
    results.add(row)
    results.set(markdown=r.stdout.strip().splitlines()[-3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
