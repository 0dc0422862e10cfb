"""Write the exact batches a training run feeds its train step, as JSON lines, to inspect data and packing.

    python tools/dump_batches.py --config=configs/7b_sft.py [--config.data.seq_len=512 ...] \\
        --num_batches 2 --output batches.jsonl [--start_step 0] [--dp 1]

The loader is built as the trainer builds it (``build_train_loader`` with the model's vocabulary bound) for a
data-parallel size of ``--dp``, and steps ``[start_step, start_step + num_batches)`` are written: one JSON object per
micro-batch per data-parallel rank, ``{"step", "micro", "row", "tokens", "labels", "positions", "segment_ids",
"type_ids"}``, where ``row`` is the rank and each list holds the ``micro_bsz * seq_len`` ints of that packed row
(labels -100 where nothing is trained). No devices are touched. The file is written to a temporary name and renamed,
so it is never half there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from internevo_jax import config as config_lib
from internevo_jax.data import loader
from internevo_jax.data.tokenized import DataError, atomic_outputs
from internevo_jax.initialize import parse_args as parse_config_args


def steps(source: Any, start: int, count: int) -> Iterator[dict[str, Any]]:
    """Items ``start .. start + count - 1`` of a loader source: random access where it has it, else streamed."""
    if isinstance(source, loader.StepSource):
        for step in range(start, start + count):
            yield source[step]
        return
    it = loader.iterate(source, 1)  # a text stream (data.type hf/streaming) has no random access
    for _ in range(start):
        next(it)
    for _ in range(count):
        yield next(it)


def records(item: dict[str, Any], dp: int) -> Iterator[dict[str, Any]]:
    """One record per (micro-batch, data-parallel row) of one step's ``[micro_num, rows, P]`` batch."""
    batch = item["batch"]
    micro_num, rows, _ = batch["tokens"].shape
    if rows != dp:
        raise RuntimeError(f"the loader returned {rows} rows for --dp {dp}")
    for m in range(micro_num):
        for r in range(rows):
            out = dict(step=int(item["step"]), micro=m, row=r)
            out.update({f: batch[f][m, r].tolist() for f in loader.FIELDS})
            yield out


def dump(config_path: str, overrides: list[str], start: int, count: int, dp: int, output: Path) -> int:
    """Writes the records to ``output``; returns how many."""
    cfg = config_lib.load(config_path, overrides)
    if start + count > cfg.data.total_steps:
        raise config_lib.ConfigError(
            f"steps {start}..{start + count - 1} run past data.total_steps {cfg.data.total_steps}, which training "
            "never reads; lower --start_step/--num_batches or raise --config.data.total_steps"
        )
    source, _ = loader.build_train_loader(cfg.data, dp, vocab_size=cfg.model.vocab_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_outputs(output) as (f,):
        for item in steps(source, start, count):
            for record in records(item, dp):
                f.write((json.dumps(record) + "\n").encode())
                n += 1
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI: the config and its ``--config.*`` overrides, the steps, the data-parallel size, the output."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument("--config", required=True, help="a config .py file (InternEvo or get_config() style)")
    parser.add_argument("--num_batches", type=int, required=True, help="how many steps to write")
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    parser.add_argument("--start_step", type=int, default=0, help="first step (default 0)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size the batches are laid out for")
    args = parse_config_args(parser, argv)
    if args.num_batches < 1 or args.start_step < 0 or args.dp < 1:
        parser.error("need --num_batches >= 1, --start_step >= 0 and --dp >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        n = dump(args.config, args.overrides, args.start_step, args.num_batches, args.dp, Path(args.output))
    except (config_lib.ConfigError, DataError) as err:
        print(f"{'config' if isinstance(err, config_lib.ConfigError) else 'data'} error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {n} rows (steps {args.start_step}..{args.start_step + args.num_batches - 1}, --dp {args.dp}) "
        f"to {args.output} in {time.time() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
