"""Measure the training loader's throughput (tokens/s per host) on packed ``.bin`` data.

    python tools/bench_loader.py [--folder DATA] [--seq_len 4096] [--num_worker 2] [--steps 50]

Without ``--folder`` it writes synthetic InternEvo data (``--num_samples`` samples of uniform random lengths in
``[--min_len, --max_len]``, ids below ``--vocab_size``) to a temporary folder, removed at the end. It then builds the
loader exactly as training does (``build_train_loader`` for one data-parallel rank, default D-05 packing) and pulls
``--steps`` batches through the grain iterator with ``--num_worker`` threads after ``--warmup`` untimed ones. A step is
``micro_num * micro_bsz * seq_len`` tokens, so tokens/s is what one host's input pipeline can feed its devices.
``--profile FILE`` writes cProfile stats of the timed steps read in the main thread (no grain threads), to see where
the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from internevo_jax import config as config_lib
from internevo_jax.data.loader import build_train_loader, iterate


def write_synthetic(folder: Path, num_samples: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> int:
    """Writes ``folder/en/synthetic.bin`` (+ ``.meta``) as tools/tokenizer.py would; returns the token count."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_samples)
    out = folder / "en" / "synthetic.bin"
    out.parent.mkdir(parents=True)
    meta = np.zeros((num_samples, 2), np.int64)
    offset = 0
    with open(out, "wb") as f:
        for i, n in enumerate(lengths):
            ids = rng.integers(1, vocab_size, size=int(n))
            line = (json.dumps({"tokens": ids.tolist()}) + "\n").encode()
            f.write(line)
            meta[i] = offset, n
            offset += len(line)
    with open(f"{out}.meta", "wb") as f:  # np.save on a path would append .npy
        np.save(f, meta)
    return int(lengths.sum())


def bench(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Times ``args.steps`` loader steps after ``args.warmup``; returns the figures."""
    overrides = [
        f"--config.data.train_folder='{folder}'",
        f"--config.data.seq_len={args.seq_len}",
        f"--config.data.micro_bsz={args.micro_bsz}",
        f"--config.data.micro_num={args.micro_num}",
        f"--config.data.num_worker={args.num_worker}",
        f"--config.data.total_steps={args.warmup + args.steps}",
        f"--config.data.pack_sample_into_one={args.pack_sample_into_one}",
        "--config.ckpt.enable_save_ckpt=False",
    ]
    cfg = config_lib.load(None, overrides)
    t0 = time.perf_counter()
    source, _ = build_train_loader(cfg.data, 1, vocab_size=args.vocab_size)
    open_s = time.perf_counter() - t0
    step_tokens = cfg.data.micro_num * cfg.data.packed_length
    if args.profile:
        for step in range(args.warmup):
            source[step]
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for step in range(args.warmup, args.warmup + args.steps):
            source[step]
        profiler.disable()
        seconds = time.perf_counter() - t0
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    else:
        it = iterate(source, cfg.data.num_worker)
        for _ in range(args.warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
        seconds = time.perf_counter() - t0
        assert batch["batch"]["tokens"].shape == (cfg.data.micro_num, 1, cfg.data.packed_length)
    return dict(open_s=open_s, seconds=seconds, tokens=step_tokens * args.steps, step_tokens=step_tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI: data source, batch shape, threads, step counts, optional profile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=None, help="a tokenized data folder (<type>/**/*.bin); default: synthetic")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--micro_bsz", type=int, default=1)
    parser.add_argument("--micro_num", type=int, default=4)
    parser.add_argument("--num_worker", type=int, default=2, help="grain reader threads (data.num_worker)")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (fills the prefetch buffer)")
    parser.add_argument("--pack_sample_into_one", action="store_true", help="fixed seq_len windows across samples")
    parser.add_argument("--num_samples", type=int, default=200_000, help="synthetic samples")
    parser.add_argument("--min_len", type=int, default=50, help="shortest synthetic sample")
    parser.add_argument("--max_len", type=int, default=4000, help="longest synthetic sample")
    parser.add_argument("--vocab_size", type=int, default=92544, help="synthetic ids and the loader's id check")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--profile", default=None, help="write cProfile stats here (single-threaded reads)")
    args = parser.parse_args(argv)
    if args.folder is not None and not Path(args.folder).is_dir():
        parser.error(f"--folder {args.folder} is not a folder")
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min_len <= --max_len, got {args.min_len}, {args.max_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tmp = None
    try:
        if args.folder is None:
            tmp = Path(tempfile.mkdtemp(prefix="bench_loader."))
            t0 = time.perf_counter()
            tokens = write_synthetic(tmp, args.num_samples, args.min_len, args.max_len, args.vocab_size, args.seed)
            print(
                f"wrote {args.num_samples:,} synthetic samples ({tokens:,} tokens) in {time.perf_counter() - t0:.1f}s"
            )
        r = bench(args, Path(args.folder) if args.folder else tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    threads = "1 thread, profiled" if args.profile else f"{args.num_worker} grain threads"
    print(
        f"loader: {r['tokens'] / r['seconds']:,.0f} tokens/s per host ({args.steps} steps of {r['step_tokens']:,} "
        f"tokens in {r['seconds']:.2f}s, {threads}; opening the data took {r['open_s']:.2f}s)"
    )


if __name__ == "__main__":
    main()
