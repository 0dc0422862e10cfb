"""Throughput formulas, InternEvo's per-step log line (§2), and the JSON-lines metrics file."""

from __future__ import annotations

import json
import logging
import math
import sys
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
    "loss_from_metric",
)


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
    model: ml_collections.ConfigDict, data: ml_collections.ConfigDict, dp: int, world: int, seconds: float
) -> float:
    """InternEvo's ``get_megatron_flops`` TFLOP/s per device (GQA and real sample lengths ignored, as theirs)."""
    b = data.micro_bsz * data.micro_num * dp
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


def format_line(values: dict[str, Any]) -> str:
    """``key=value`` pairs separated by spaces in ``LINE_KEYS`` order, as v0.3.4 logs them."""
    return " ".join(f"{k}={values[k]}" for k in LINE_KEYS if k in values)


def parse_line(line: str) -> dict[str, float]:
    """Inverse of ``format_line`` for tools and tests: the message part of a log line -> {key: number}."""
    message = line.split(" -- ", 1)[-1].strip()
    out: dict[str, float] = {}
    for i, key in enumerate(LINE_KEYS):
        marker = f"{key}="
        start = message.find(marker)
        if start < 0:
            continue
        start += len(marker)
        end = len(message)
        for later in LINE_KEYS[i + 1 :]:
            pos = message.find(f" {later}=", start)
            if pos >= 0:
                end = pos
                break
        out[key] = float(message[start:end])
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
