"""Time the training step of a config on synthetic data; print one markdown table (and JSON with ``--json``).

    python tools/benchmark.py --config=configs/internlm2_1_8b.py [--config.data.micro_bsz=2 ...] \\
        [--steps 10] [--warmup 3] [--json OUT.json]

The config's model, parallel layout and batch shape are used as they are; the data is forced to InternEvo's dummy
data (``data.type='dummy'``, no validation), checkpoint saving and loading are off, and the run folder is a
temporary one. The step is the one training runs (``Trainer.train_step``: AOT-compiled, state donated). Each step's
batch is placed on the devices first, then the step is timed to ``jax.block_until_ready`` -- the only per-step host
syncs, here on purpose. Reported: the median of ``--steps`` timed steps after ``--warmup`` untimed ones; tokens/s per
device; MFU with causal attention (``metrics.causal_flops_per_token``, the dense peak of ``metrics.PEAK_TFLOPS``);
InternEvo's megatron TFLOP/s; the peak device memory (allocator statistics, or the compiled step's memory analysis
where the platform has none, e.g. CPU, labelled as an estimate).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import jax
import jaxlib

from internevo_jax import config as config_lib
from internevo_jax import distributed
from internevo_jax.data import loader
from internevo_jax.initialize import get_default_parser, initialize_distributed_env, parse_args
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.monitoring.metrics import causal_flops_per_token, megatron_tflops, mfu, peak_tflops
from internevo_jax.train import Trainer


def forced_overrides(run_folder: str, total_steps: int) -> list[str]:
    """What the benchmark pins, applied after the user's overrides: synthetic data, no checkpoints, a temp folder."""
    return [
        "--config.data.type='dummy'",
        "--config.data.train_folder=None",
        "--config.data.valid_folder=None",
        "--config.data.valid_every=0",
        "--config.data.rampup_batch_size=''",  # every timed step has the full batch
        "--config.data.skip_batches=''",
        f"--config.data.total_steps={total_steps}",
        "--config.ckpt.enable_save_ckpt=False",
        "--config.ckpt.auto_resume=False",
        "--config.ckpt.load_ckpt_info=None",  # weights do not change the speed; a fresh init needs no files
        f"--config.run_folder='{run_folder}'",
    ]


def peak_memory(trainer: Trainer) -> tuple[int | None, str]:
    """(bytes, source): the largest ``peak_bytes_in_use`` over local devices, else the compiled step's estimate."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks), "memory_stats"
    ma = trainer.train_step.memory_analysis()
    if ma is None:
        return None, "unavailable"
    total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    return int(total), "estimate"  # per device: temporaries + inputs + outputs, donated (aliased) buffers once


def run(config, steps: int, warmup: int, config_path: str) -> dict:
    """Builds the trainer in a temporary run folder and times ``steps`` steps after ``warmup``; returns the fields."""
    trainer = Trainer(config, Path(config.run_folder))
    state, _ = trainer.initial_state()
    it = loader.iterate(trainer.source, config.data.num_worker)
    times, losses = [], []  # losses of every step, warmup included
    for i in range(warmup + steps):
        batch = trainer.to_device(next(it)["batch"])
        jax.block_until_ready(batch)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))  # after the timed region: the step is already done

    device = jax.devices()[0]
    world = trainer.world
    step_s = statistics.median(times)
    global_tokens = 1
    for n in trainer.global_batch_shape:
        global_tokens *= n
    tgs = global_tokens / world / step_s
    dtype = config_lib.jax_dtype_name(config.model)
    peak = peak_tflops(device.device_kind, dtype)
    flops_per_token = causal_flops_per_token(config.model, config.data.seq_len)
    memory, memory_source = peak_memory(trainer)
    return dict(
        date=datetime.now().strftime("%Y-%m-%d %H:%M"),
        config=config_path,
        device_kind=device.device_kind,
        device_count=world,
        process_count=jax.process_count(),
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        mesh=dict(trainer.mesh.shape),
        dtype=dtype,
        num_params=trainer.num_params,
        global_batch_tokens=global_tokens,
        seq_len=config.data.seq_len,
        steps=steps,
        warmup=warmup,
        step_seconds=times,
        step_seconds_median=step_s,
        tokens_per_second_per_device=tgs,
        compile_seconds=trainer.compile_seconds,
        flops_per_token_causal=flops_per_token,
        peak_tflops=peak,
        mfu=mfu(flops_per_token, tgs, peak),
        tflops_megatron=megatron_tflops(config.model, config.data, trainer.dp, world, step_s),
        peak_memory_bytes=memory,
        peak_memory_source=memory_source,
        losses=losses,
        final_loss=losses[-1],
    )


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(r: dict) -> str:
    """One markdown table: a header row and the measured row."""
    if r["mfu"] is None:
        mfu_text = f"n/a (unknown peak for {r['device_kind']})"
    else:
        mfu_text = f"{r['mfu']:.1%} of {r['peak_tflops']:g}"
    memory = "n/a" if r["peak_memory_bytes"] is None else _bytes(r["peak_memory_bytes"])
    if r["peak_memory_source"] == "estimate":
        memory += " (estimate: compiled step)"
    cells = {
        "date": r["date"],
        "device": f"{r['device_count']}x {r['device_kind']}",
        "jax / jaxlib": f"{r['jax_version']} / {r['jaxlib_version']}",
        "config": f"`{r['config']}` ({r['dtype']})",
        "params": f"{r['num_params'] / 1e6:.2f}M",
        "global batch tokens": str(r["global_batch_tokens"]),
        "tokens/s/device": f"{r['tokens_per_second_per_device']:.1f}",
        "step time (median)": f"{r['step_seconds_median'] * 1e3:.1f} ms",
        "compile": f"{r['compile_seconds']:.1f} s",
        "MFU (causal)": mfu_text,
        "tflops (megatron)": f"{r['tflops_megatron']:.3g}",
        "peak memory/device": memory,
    }
    return markdown_table(cells)


def markdown_table(cells: dict[str, str]) -> str:
    """A header row of the keys and one row of the values."""
    return "\n".join(
        ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells), "| " + " | ".join(cells.values()) + " |"]
    )


def timing_parser(doc: str) -> argparse.ArgumentParser:
    """The default parser plus the timing flags every benchmark tool takes (``--steps``, ``--warmup``, ``--json``)."""
    parser = get_default_parser()
    parser.description = doc.split("\n")[0]
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", type=str, default=None, help="also write the fields as JSON to this file")
    return parser


def parse_timing_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parse_args(parser, argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__)
    parser.add_argument("--verbose", action="store_true", help="keep the trainer's log lines")
    args = parse_timing_args(parser, argv)
    if not args.verbose:
        get_logger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        overrides = args.overrides + forced_overrides(tmp, args.warmup + args.steps)
        launcher = args.launcher or distributed.detect_launcher()
        try:
            config = initialize_distributed_env(
                args.config, launcher, args.port, args.seed, overrides, start_cluster=launcher != "local"
            )
        except config_lib.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        result = run(config, args.steps, args.warmup, args.config)
    if jax.process_index() == 0:
        report(table(result), result, args.json)
    return 0


def report(text: str, result: dict, json_path: str | None) -> None:
    """Prints the table and, with ``--json``, writes the fields."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
