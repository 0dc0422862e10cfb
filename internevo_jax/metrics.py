"""Throughput formulas, InternEvo's per-step log line (§2), and the JSON-lines metrics file."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.config import ffn_width

LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s in %(funcName)s -- %(message)s"  # MON-01

# Keys of the log line, in InternEvo's order; "tgs (tokens/gpu/second)" is spelled as InternEvo spells it.
LINE_KEYS = (
    "tflops",
    "step",
    "loss",
    "tgs (tokens/gpu/second)",
    "lr",
    "loss_scale",
    "grad_norm",
    "micro_num",
    "num_consumed_tokens",
    "inf_nan_skip_batches",
    "num_samples_in_batch",
    "largest_length",
    "largest_batch",
    "smallest_batch",
    "adam_beta2",
    "fwd_bwd_time",
    "acc",
    "perplexity",
    "loss_from_metric",
)
# Per-dataset-type keys "{prefix}{type}": each group follows the key named here, types in the data loader's order.
TYPED_KEYS = {"perplexity": ("acc/", "tokens/"), "loss_from_metric": ("loss/",)}


def get_logger() -> logging.Logger:
    """The package logger, formatted like InternEvo's, writing to stdout."""
    logger = logging.getLogger("internevo_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def megatron_tflops(
    model: ml_collections.ConfigDict,
    data: ml_collections.ConfigDict,
    dp: int,
    world: int,
    seconds: float,
    micro_num: int | None = None,
) -> float:
    """InternEvo's ``get_megatron_flops`` TFLOP/s per device (GQA and real sample lengths ignored, as theirs).

    ``micro_num`` is this step's (smaller during a batch-size rampup); None means ``data.micro_num``.
    """
    b = data.micro_bsz * (data.micro_num if micro_num is None else micro_num) * dp
    s, h, layers, v = data.seq_len, model.hidden_size, model.num_layers, model.vocab_size
    ratio = 1.5 * model.mlp_ratio  # swiglu
    f = 4 if model.checkpoint else 3
    flops = f * ((8 + 4 * ratio) * b * s * h * h + 4 * b * s * s * h) * layers + 6 * b * s * h * v
    return flops / (seconds * world * 1e12)


def causal_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token counting causal attention: 6 N + 6 L H_q d_h S (N = non-embedding params + head)."""
    d, n_q, n_kv = model.hidden_size, model.num_attention_heads, model.num_kv_attention_heads
    hd = d // n_q
    f = ffn_width(d, model.mlp_ratio, model.multiple_of)
    per_layer = d * (n_q + 2 * n_kv) * hd + n_q * hd * d + 3 * d * f
    n = model.num_layers * per_layer + d * model.vocab_size
    return 6 * n + 6 * model.num_layers * n_q * hd * seq_len


def line_keys(dataset_types: Sequence[str] = ()) -> tuple[str, ...]:
    """Every key of the log line in InternEvo's order, the per-type keys spelt out for ``dataset_types``."""
    keys: list[str] = []
    for key in LINE_KEYS:
        keys.append(key)
        for prefix in TYPED_KEYS.get(key, ()):
            keys += [f"{prefix}{t}" for t in dataset_types]
    return tuple(keys)


def format_line(values: dict[str, Any]) -> str:
    """``key=value`` pairs separated by spaces in ``line_keys`` order, as v0.3.4 logs them.

    The dataset types are read from the ``tokens/{type}`` keys of ``values``, in their order.
    """
    types = [k.removeprefix("tokens/") for k in values if k.startswith("tokens/")]
    return " ".join(f"{k}={values[k]}" for k in line_keys(types) if k in values)


def parse_line(line: str) -> dict[str, float]:
    """Inverse of ``format_line`` for tools and tests: the message part of a log line -> {key: number}."""
    message = line.split(" -- ", 1)[-1].strip()
    # Keys are found where they start (the message start or after a space); a value runs to the next key. Type names
    # are whatever follows a per-type prefix up to "=", so they may not hold spaces or "=" (folder names do not).
    prefixes = "|".join(re.escape(p) for group in TYPED_KEYS.values() for p in group)
    known = "|".join(re.escape(k) for k in sorted(LINE_KEYS, key=len, reverse=True))
    starts = list(re.finditer(rf"(?:^| )((?:{prefixes})[^\s=]+|{known})=", message))
    out: dict[str, float] = {}
    for m, after in zip(starts, starts[1:] + [None], strict=True):
        end = after.start() if after is not None else len(message)
        out.setdefault(m.group(1), float(message[m.end() : end]))
    return out


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
