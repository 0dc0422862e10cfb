"""Where a step's numbers go: InternEvo's log line, the JSON-lines file, TensorBoard, the monitor, a terminal status.

The trainer hands over host values once per step (one step late, so the device never waits for the host); this
module turns them into InternEvo's line (docs/internevo_parity.md#log-line), appends the same values to
``metrics.jsonl``, writes TensorBoard scalars (x = ``step_count``, as InternEvo's writer), and lets the monitor look
for spikes and NaNs. On a terminal a status line (progress, loss, throughput, ETA) stays at the bottom under the
scrolling log; elsewhere (files, CI) only the plain lines are written.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax import config as config_lib
from internevo_jax.monitoring.alerts import Monitor
from internevo_jax.monitoring.logger import get_logger
from internevo_jax.monitoring.metrics import (
    JsonlWriter,
    PrintedSchedules,
    TgsStatistic,
    causal_flops_per_token,
    format_line,
    megatron_tflops,
)
from internevo_jax.monitoring.tensorboard import TensorBoardWriter


class StatusLine(logging.StreamHandler):
    """A log handler that keeps one redrawn status line below the log records (terminals only)."""

    def __init__(self, stream: Any, formatter: logging.Formatter | None):
        super().__init__(stream)
        self.setFormatter(formatter)
        self.status = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write("\r\x1b[K")  # clear the status line, print the record above it, redraw the status
        super().emit(record)
        self._draw()

    def update(self, status: str) -> None:
        self.status = status
        self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((120, 20)).columns
        self.stream.write("\r\x1b[K" + self.status[: max(width - 1, 0)])
        self.stream.flush()

    def close(self) -> None:
        if self.status:
            self.stream.write("\n")
            self.stream.flush()
        super().close()


def wants_status_line(stream: Any = None) -> bool:
    """True on an interactive terminal (not under CI, not with TERM=dumb, not when output goes to a file)."""
    stream = stream or sys.stdout
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    return interactive and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


class Reporter:
    """Formats and writes training and validation metrics; only process 0 writes files and alerts."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        run_dir: Path,
        dataset_types: Sequence[str],
        dp: int,
        world: int,
        monitor: Monitor,
        start_step_count: int = 0,
        is_main: bool = True,
        status: bool | None = None,
    ):
        self.config, self.types, self.dp, self.world, self.monitor = config, list(dataset_types), dp, world, monitor
        self.is_main = is_main
        self.log = get_logger()
        self.tokens_per_micro = config.data.packed_length * dp  # one micro-batch over all data-parallel rows
        self.flops_per_token = causal_flops_per_token(config.model, config.data.seq_len)
        self.tgs = TgsStatistic()
        self.schedules = PrintedSchedules(config.adam, config.lr_scheduler, config.beta2_scheduler)
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl") if is_main else None
        self.tb = None
        if is_main and config.enable_tb:
            folder = Path(config.tensorboard_folder or run_dir / "tensorboards")
            if config.resume_tb_folder:  # InternEvo copies the previous run's curves in, so one folder holds them all
                shutil.copytree(config.resume_tb_folder, folder, dirs_exist_ok=True)
            # purge_step: after a resume TensorBoard drops the events the crashed run wrote past the checkpoint.
            self.tb = TensorBoardWriter(folder, purge_step=start_step_count or None)
            self.tb.text("job_name", config.JOB_NAME)
            self.tb.text("config", config_lib.to_json(config))
            self.tb.flush()
        self.status = None
        if is_main and (wants_status_line() if status is None else status):
            handler = next((h for h in self.log.handlers if isinstance(h, logging.StreamHandler)), None)
            self.status = StatusLine(sys.stdout, handler.formatter if handler else None)
            self._replaced = handler
            if handler is not None:
                self.log.removeHandler(handler)
            self.log.addHandler(self.status)
        self.t0, self.first_step = time.time(), 0

    def train(
        self,
        batch_count: int,
        values: dict[str, Any],
        stats: dict[str, int],
        consumed: int,
        micro_num: int,
        seconds: float,
    ) -> dict[str, Any]:
        """Logs step ``batch_count`` (InternEvo's ``step=``) from the step's host ``values``; returns the line.

        ``tgs/*`` count the steps that updated (InternEvo logs no line for the others); ``lr`` and ``adam_beta2``
        are InternEvo's Python-float values for the step count (``PrintedSchedules``), not the device's float32.
        """
        cfg, types = self.config, self.types
        step_count = int(values["step_count"])
        tokens_per_device = micro_num * self.tokens_per_micro / self.world
        tgs = tokens_per_device / seconds
        if bool(values.get("finite", True)):
            tgs_keys = self.tgs.update(tokens_per_device, seconds)
        else:
            tgs_keys = {"tgs/last_tgs_1": round(round(tokens_per_device, 4) / seconds, 2), **self.tgs.values()}
        line = dict(
            tflops=megatron_tflops(cfg.model, cfg.data, self.dp, self.world, seconds, micro_num),
            step=batch_count,
            loss=float(values["loss"]),
            **{"tgs (tokens/gpu/second)": round(tgs, 2)},
            **tgs_keys,
            lr=self.schedules.lr(step_count),
            loss_scale=float(values["loss_scale"]),
            grad_norm=float(values["grad_norm"]),
            **({"moe_loss": float(values["moe_loss"])} if "moe_loss" in values else {}),
            micro_num=micro_num,
            num_consumed_tokens=consumed,
            inf_nan_skip_batches=int(values["inf_nan_skip_batches"]),
            **stats,
            adam_beta2=self.schedules.beta2(step_count),
            fwd_bwd_time=round(seconds, 2),
            acc=round(float(values["acc"]), 4),
            perplexity=round(float(values["perplexity"]), 4),
            **{f"acc/{t}": round(float(a), 4) for t, a in zip(types, values["type_acc"], strict=True)},
            **{f"tokens/{t}": int(n) for t, n in zip(types, values["type_tokens"], strict=True)},
            loss_from_metric=round(float(values["loss_from_metric"]), 4),
            **{f"loss/{t}": round(float(x), 4) for t, x in zip(types, values["type_loss"], strict=True)},
        )
        if self.is_main:  # InternEvo logs the line on one rank; the others would repeat it
            self.log.info(format_line(line))
        if self.jsonl is not None:
            record = dict(
                line,
                tgs=line["tgs (tokens/gpu/second)"],
                step_count=step_count,
                model_tflops_causal=self.flops_per_token * tgs / 1e12,
                time=time.time(),
            )
            self.jsonl.write(record)
        if self.tb is not None:
            # InternEvo's tags are the line's keys; "tgs (tokens/gpu/second)" is written as "tgs" (the tgs/* keys
            # sit beside it in TensorBoard's "tgs" group).
            scalars = {("tgs" if k == "tgs (tokens/gpu/second)" else k): v for k, v in line.items() if k != "step"}
            self.tb.scalars(step_count, scalars)
            if step_count % max(self.config.monitor.tensorboard.queue_max_length, 1) == 0:
                self.tb.flush()
        self.monitor.step(batch_count, line, seconds)
        if self.status is not None:
            self.status.update(self._status_text(batch_count, line))
        return line

    def valid(self, batch_count: int, step_count: int, name: str, values: dict[str, float]) -> None:
        """InternEvo's ``Validation on {name}: step=... val/{name}_loss=... val/{name}_acc=... val/{name}_plex=...``."""
        keyed = {f"val/{name}_{k}": v for k, v in values.items()}
        if not self.is_main:
            return
        self.log.info("Validation on %s: step=%d %s", name, batch_count, " ".join(f"{k}={v}" for k, v in keyed.items()))
        if self.jsonl is not None:
            self.jsonl.write(dict(step=batch_count, step_count=step_count, **keyed, time=time.time()))
        if self.tb is not None:
            self.tb.scalars(step_count, keyed)
            self.tb.flush()

    def _status_text(self, batch_count: int, line: dict[str, Any]) -> str:
        total = self.config.data.total_steps
        done = batch_count + 1
        rate = (time.time() - self.t0) / max(done - self.first_step, 1)
        eta = _duration(rate * (total - done))
        return (
            f"[{done}/{total} {100 * done / total:.0f}%] loss {line['loss']:.4f} lr {line['lr']:.3g} "
            f"grad_norm {line['grad_norm']:.3g} tgs {line['tgs (tokens/gpu/second)']:.0f} eta {eta}"
        )

    def start(self, batch_count: int) -> None:
        """Marks the batch this run starts at and the wall-clock origin (for the ETA)."""
        self.t0, self.first_step = time.time(), batch_count

    def close(self) -> None:
        """Closes metrics.jsonl and TensorBoard and gives the logger its handler back; a second call does nothing
        (a run's normal end and its error path both call it)."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.status is not None:
            self.log.removeHandler(self.status)
            self.status.close()
            if self._replaced is not None:
                self.log.addHandler(self._replaced)
        self.jsonl, self.tb, self.status = None, None, None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
