"""Throughput formulas, InternEvo's per-step log line with its tgs statistics and printed schedules, and the JSON-lines
metrics file (docs/internevo_parity.md#log-line)."""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.config import ffn_width
from internevo_jax.errors import run_folder_write

# Keys of the log line, in InternEvo's order; "tgs (tokens/gpu/second)" is spelled as InternEvo spells it.
LINE_KEYS = (
    "tflops",
    "step",
    "loss",
    "tgs (tokens/gpu/second)",
    "tgs/last_tgs_1",
    "tgs/tgs_all",
    "tgs/tgs_avg",
    "tgs/tgs_SMA",
    "tgs/last_tgs_10",
    "tgs/last_tgs_50",
    "lr",
    "loss_scale",
    "grad_norm",
    "moe_loss",  # MoE models only (LS-04), where InternEvo's line has it
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


class TgsStatistic:
    """InternEvo's ``tgs/*`` keys (v0.3.4 ``record_current_batch_training_metrics``), with its arithmetic and rounding.

    Fed once per successful step with the step's tokens per device (rounded to 4 places, as theirs) and seconds:

    - ``tgs/last_tgs_1``: this step's tokens / seconds;
    - ``tgs/tgs_all``: all steps' tokens / all steps' seconds;
    - ``tgs/tgs_avg``: the mean of the ``last_tgs_1`` values (each already rounded to 2 places);
    - ``tgs/tgs_SMA``: tokens / seconds over the last 50 steps;
    - ``tgs/last_tgs_10``, ``tgs/last_tgs_50``: tokens / seconds of the 10 (50) steps that ended at the last
      multiple of 10 (50) steps, refreshed every 10 (50) steps and 0 (an int) until then.

    Steps count from this process's start, as InternEvo's ``TrainState.tgs_statistic`` (not checkpointed).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.sum_tokens = self.sum_seconds = 0.0
        self.window = {10: [0.0, 0.0], 50: [0.0, 0.0]}  # tokens, seconds since the last refresh
        self.last: dict[int, float] = {10: 0, 50: 0}
        self.sma_tokens = self.sma_seconds = 0.0
        self.sma: deque[tuple[float, float]] = deque()
        self.sum_tgs = 0.0

    def update(self, tokens_per_device: float, seconds: float) -> dict[str, float]:
        """Counts one step; returns the six ``tgs/*`` values."""
        tk = round(tokens_per_device, 4)
        self.steps += 1
        self.sum_tokens += tk
        self.sum_seconds += seconds
        for sums in self.window.values():
            sums[0] += tk
            sums[1] += seconds
        self.sma_tokens += tk
        self.sma_seconds += seconds
        self.sma.append((tk, seconds))
        if self.steps > 50:
            old_tk, old_s = self.sma.popleft()
            self.sma_tokens -= old_tk
            self.sma_seconds -= old_s
        last_1 = round(tk / seconds, 2)
        self.sum_tgs += last_1
        for n, sums in self.window.items():
            if self.steps % n == 0:
                self.last[n] = round(sums[0] / sums[1], 2)
                sums[0] = sums[1] = 0.0
        return {"tgs/last_tgs_1": last_1, **self.values()}

    def values(self) -> dict[str, float]:
        """The five running values as they stand (0 before the first step), without counting a step."""
        if self.steps == 0:
            return {"tgs/tgs_all": 0, "tgs/tgs_avg": 0, "tgs/tgs_SMA": 0, "tgs/last_tgs_10": 0, "tgs/last_tgs_50": 0}
        return {
            "tgs/tgs_all": round(self.sum_tokens / self.sum_seconds, 2),
            "tgs/tgs_avg": round(self.sum_tgs / self.steps, 2),
            "tgs/tgs_SMA": round(self.sma_tokens / self.sma_seconds, 2),
            "tgs/last_tgs_10": self.last[10],
            "tgs/last_tgs_50": self.last[50],
        }


class PrintedSchedules:
    """The ``lr`` and ``adam_beta2`` InternEvo prints after ``count`` successful updates, in Python floats.

    The device computes both schedules in float32 (``optim.py``), whose values print as ``0.949999988079071``.
    InternEvo prints ``optimizer.param_groups[0]["lr"]`` as torch's schedulers leave it: its
    ``FineTuneCosineAnnealingWarmupLR`` (``(k + 1 - init_steps) / warmup_steps * lr`` while warming up, then torch's
    ``CosineAnnealingLR`` *recursion* on the previous lr, which differs from the closed form in the last digits) and
    ``Beta2Scheduler.get_beta2()``. Both are replayed here in float64 on the host, operation for operation, so the
    printed digits are InternEvo's (``lr=4.0000000000000003e-07``, ``adam_beta2=0.95``). The recursion is walked
    forward incrementally: after a resume the first call replays it from 0 (about 1 us a step).
    """

    def __init__(
        self,
        adam: ml_collections.ConfigDict,
        lr_scheduler: ml_collections.ConfigDict,
        beta2_scheduler: ml_collections.ConfigDict,
    ):
        self.base, self.eta_min, self.init = adam.lr, lr_scheduler.eta_min, lr_scheduler.init_steps
        self.warmup = int(lr_scheduler.total_steps * lr_scheduler.warmup_ratio)
        self.warmup_epochs = self.init + self.warmup
        # CosineAnnealingLR's T_max; InternEvo divides by zero when warmup fills total_steps, optim.py uses 1.
        self.t_max = max(lr_scheduler.total_steps - self.warmup_epochs, 1)
        self.init_beta2, self.c = beta2_scheduler.init_beta2, beta2_scheduler.c
        self._epoch: int = -1  # the scheduler's last_epoch
        self._lr: float | None = None  # the lr it set (None before its first step)

    def lr(self, count: int) -> float:
        """The lr the scheduler has set after ``count`` steps (``count`` successful updates: the next update's)."""
        if count < self._epoch:
            self._epoch, self._lr = -1, None
        while self._epoch < count:
            self._epoch += 1
            self._lr = self._step(self._epoch, self._lr)
        if self._lr is None:
            raise ValueError(f"the lr schedule starts at step count 0; got count={count}")
        return self._lr

    def _step(self, epoch: int, lr: float | None) -> float:
        if epoch < self.warmup_epochs:
            if epoch >= self.init:
                return (epoch + 1 - self.init) / self.warmup * self.base
            return 0  # an int, as InternEvo's get_lr returns during init_steps (prints "lr=0")
        if epoch == self.warmup_epochs:  # the cosine scheduler takes over at its epoch 0: it keeps the current lr
            return self.base if lr is None else lr
        j, t = epoch - self.warmup_epochs, self.t_max
        if (j - 1 - t) % (2 * t) == 0:
            return lr + (self.base - self.eta_min) * (1 - math.cos(math.pi / t)) / 2
        return (1 + math.cos(math.pi * j / t)) / (1 + math.cos(math.pi * (j - 1) / t)) * (
            lr - self.eta_min
        ) + self.eta_min

    def beta2(self, count: int) -> float:
        """``Beta2Scheduler.get_beta2()`` after ``count`` steps: ``max(init_beta2, 1 - 1 / count**c)`` for c > 0."""
        if self.c <= 0 or count <= 0:
            return self.init_beta2
        return max(self.init_beta2, 1 - (1 / count**self.c))


def causal_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token counting causal attention: 6 N + 6 L H_q d_h S (N = non-embedding params + head)."""
    d, n_q, n_kv = model.hidden_size, model.num_attention_heads, model.num_kv_attention_heads
    hd = model.head_dim  # hidden_size / num_attention_heads unless set (Gemma)
    f = ffn_width(d, model.mlp_ratio, model.multiple_of)
    per_layer = d * (n_q + 2 * n_kv) * hd + n_q * hd * d + 3 * d * f
    n = model.num_layers * per_layer + d * model.vocab_size
    return 6 * n + 6 * model.num_layers * n_q * hd * seq_len


# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s per device: (bf16 and fp16, tf32), from NVIDIA's datasheets
# (sparse figures halved). Matched in order against jax's ``device.device_kind`` (the CUDA device name), so the more
# specific names come first; word boundaries keep H20 from matching H200 and L40 from matching L40S.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bH100\b.*\bPCIE\b", 756.0, 378.0),
    (r"\bH100\b.*\bNVL\b", 835.5, 417.5),
    (r"\bH100\b", 989.4, 494.7),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", 835.5, 417.5),
    (r"\b(GH200|H200)\b", 989.4, 494.7),
    (r"\bH800\b.*\bPCIE\b", 756.0, 378.0),
    (r"\bH800\b", 989.4, 494.7),
    (r"\bH20\b", 148.0, 74.0),
    (r"\b(A100|A800)\b", 312.0, 156.0),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bL40S\b", 362.0, 183.0),
    (r"\bL40\b", 181.0, 90.5),
)
# model.dtype (InternEvo's torch names or jax's) -> the PEAK_TFLOPS column. float32 uses the TF32 tensor-core peak:
# torch.tf32 runs at XLA's default matmul precision, which uses TF32 on these GPUs; torch.float32 asks for precision
# "highest" (model.py), i.e. true fp32 at a fraction of that peak, so its MFU reads low. fp32 is for CPU tests and
# demos, and an MFU that can only understate is the safer mistake.
_PEAK_COLUMN = {"bfloat16": 1, "float16": 1, "half": 1, "float32": 2, "tf32": 2}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of one ``device_kind`` device for ``dtype`` (model.dtype or its jax name); None if unknown.

    >>> peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")
    989.4
    """
    column = _PEAK_COLUMN.get(dtype.removeprefix("torch."))
    if column is None:
        raise ValueError(f"peak_tflops: unknown dtype {dtype!r}; valid: {sorted(_PEAK_COLUMN)} (or torch.<name>)")
    kind = re.sub(r"[-_]", " ", device_kind.upper())
    for pattern, *peaks in PEAK_TFLOPS:
        if re.search(pattern, kind):
            return peaks[column - 1]
    return None


def mfu(flops_per_token: float, tokens_per_second_per_device: float, peak: float | None) -> float | None:
    """Model FLOP utilisation as a fraction (0.45 = 45%) of ``peak`` TFLOP/s; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return flops_per_token * tokens_per_second_per_device / (peak * 1e12)


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
        with run_folder_write(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with run_folder_write(self.path):
            self._f.write(json.dumps(clean) + "\n")
            self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # the line that failed already raised RunFolderError; closing must not hide it
            pass
