"""Checks across fields, one function per section, and the derived values they fill in (the model section's are
``model_checks.py``).

Each ``check_*`` takes the plain dict of its section (the whole config where a check spans sections) and ``need``, a
``Checker`` that raises ``ConfigError`` naming where the offending value came from. ``finalize`` runs them in order;
``check_pipeline`` runs on the locked config (the pipeline schedule's own constraints).
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any

import ml_collections

from internevo_jax.config.ckpt_keys import check_ckpt
from internevo_jax.config.errors import Checker, ConfigError
from internevo_jax.config.merge import get
from internevo_jax.config.model_checks import check_model, check_model_type, check_sliding_window
from internevo_jax.config.parsers import parse_rampup, parse_skip_batches
from internevo_jax.config.schema import (
    DATA_TYPES,
    TENSOR_MODES,
    ffn_width,
    leaves,
)
from internevo_jax.config.unsupported import check_unsupported


def finalize(cfg: dict, need: Checker, given: AbstractSet[str] = frozenset()) -> None:
    """Fills derived values and checks across fields; ``given``: the dotted keys the file or an override set."""
    check_data(cfg["data"], need)
    check_model_type(cfg["model_type"], need)
    check_ranges(cfg, need)  # before anything divides by a size
    check_model(cfg["model"], cfg["model_type"], need)
    check_sliding_window(cfg["model"], cfg["data"], need)
    check_parallel(cfg["parallel"], need)
    check_unsupported(cfg, need)
    try:
        parse_skip_batches(cfg["data"]["skip_batches"])
    except ConfigError as e:
        need(False, str(e))
    check_optimizer(cfg, need)
    check_ckpt(cfg["ckpt"], need, info_given="ckpt.load_ckpt_info" in given)
    check_monitor(cfg["monitor"], need)
    data = cfg["data"]
    need(data["valid_every"] >= 0, f"data.valid_every must be >= 0 (0: no validation), got {data['valid_every']}")
    need(data["valid_micro_num"] >= 1, f"data.valid_micro_num must be >= 1, got {data['valid_micro_num']}")
    check_generation(cfg["generation"], need)
    need(
        cfg["JOB_NAME"] != "" and "/" not in cfg["JOB_NAME"],
        f"JOB_NAME={cfg['JOB_NAME']!r} must be a non-empty name without '/'",
    )


def check_data(data: dict, need: Checker) -> None:
    """Required sizes, the data type and what it reads; ``packed_length`` is set as InternEvo sets it."""
    for key in ("seq_len", "micro_bsz"):
        need(data[key] is not None, f"data.{key} is required (InternEvo has no default for it)")
        need(data[key] > 0, f"data.{key} must be positive, got {data[key]}")
    need(data["micro_num"] >= 1, f"data.micro_num must be >= 1, got {data['micro_num']}")
    need(data["total_steps"] >= 1, f"data.total_steps must be >= 1, got {data['total_steps']}")
    need(
        data["gradient_accumulation"] == data["micro_num"],
        f"data.gradient_accumulation ({data['gradient_accumulation']}) must equal data.micro_num "
        f"({data['micro_num']}) without pipeline parallelism",
    )
    need(data["min_length"] >= 0, f"data.min_length must be >= 0, got {data['min_length']}")
    for key, value in (data["min_length_dict"] or {}).items():
        need(
            isinstance(key, str) and isinstance(value, int) and value >= 0,
            f"data.min_length_dict maps path substrings to token counts >= 0, got {key!r}: {value!r}",
        )
    # InternEvo ignores a user packed_length (with a warning); we say so and overwrite it the same way.
    data["packed_length"] = data["seq_len"] * data["micro_bsz"]
    need(data["type"] in DATA_TYPES, f"data.type={data['type']!r} is unknown; valid: {DATA_TYPES}")
    if data["type"] in ("hf", "streaming"):
        need(
            data["train_folder"] is not None,
            f"data.type={data['type']!r} reads data.train_folder: set it to a Hugging Face dataset name or a local "
            "folder/file of .jsonl/.json/.parquet/.arrow files",
        )
        need(
            data["tokenizer_path"] is not None,
            f"data.type={data['type']!r} tokenizes on the fly: set data.tokenizer_path to a SentencePiece .model "
            "file or a Hugging Face tokenizer folder",
        )
        need(
            isinstance(data["content_name"], str) and data["content_name"] != "",
            f"data.content_name must name the text field of the records, got {data['content_name']!r}",
        )


def check_parallel(par: dict, need: Checker) -> None:
    """The ``parallel`` section: a known tensor mode, sizes >= 1 (ZeRO's InternEvo quirks kept), derived flags."""
    mode = par["tensor"].get("mode", "mtp")
    need(mode in TENSOR_MODES, f"parallel.tensor.mode={mode!r} is unknown; valid: {TENSOR_MODES}")
    par["sequence_parallel"] = mode in ("msp", "fsp", "isp")
    if par["zero1"]["size"] != -1 and par["zero1"]["size"] <= 0:
        par["zero1"]["size"] = 1  # InternEvo: 0 and other negatives mean "no ZeRO" (quirk 5.11)
    need(par["weight"]["size"] == 1 or mode == "isp", "parallel.weight.size > 1 needs parallel.tensor.mode='isp'")
    for key in ("tensor", "pipeline", "weight"):
        need(par[key]["size"] >= 1, f"parallel.{key}.size must be >= 1, got {par[key]['size']}")


def check_optimizer(cfg: dict, need: Checker) -> None:
    """Loss chunking, the non-finite-step limit, gradient clipping and the lr schedule."""
    need(cfg["loss"]["logits_chunk_size"] >= 0, "loss.logits_chunk_size must be >= 0 (0 = no chunking)")
    need(
        cfg["hybrid_zero_optimizer"]["max_consecutive_inf_nan"] >= 1,
        "hybrid_zero_optimizer.max_consecutive_inf_nan must be >= 1",
    )
    clip = cfg["hybrid_zero_optimizer"]["clip_grad_norm"]
    need(clip >= 0, f"hybrid_zero_optimizer.clip_grad_norm must be >= 0, got {clip}")
    need(0 <= cfg["lr_scheduler"]["warmup_ratio"] <= 1, "lr_scheduler.warmup_ratio must be in [0, 1]")
    need(cfg["lr_scheduler"]["total_steps"] >= 1, "lr_scheduler.total_steps must be >= 1")


def check_monitor(mon: dict, need: Checker) -> None:
    """The ``monitor`` section: webhook format, alert thresholds, watchdog and profiler windows."""
    alert = mon["alert"]
    formats = ("feishu", "json")
    need(alert["webhook_format"] in formats, f"monitor.alert.webhook_format={alert['webhook_format']!r}: {formats}")
    need(alert["loss_spike_ratio"] > 1, f"monitor.alert.loss_spike_ratio must be > 1, got {alert['loss_spike_ratio']}")
    need(alert["heartbeat_every"] >= 1, f"monitor.alert.heartbeat_every must be >= 1, got {alert['heartbeat_every']}")
    need(mon["hang_timeout_seconds"] >= 0, "monitor.hang_timeout_seconds must be >= 0 (0 turns the watchdog off)")
    need(mon["slow_step_ratio"] > 1, f"monitor.slow_step_ratio must be > 1, got {mon['slow_step_ratio']}")
    need(mon["profile_start_step"] >= 0, "monitor.profile_start_step must be >= 0")
    need(mon["profile_num_steps"] >= 1, "monitor.profile_num_steps must be >= 1")


def _in_interval(value: Any, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    low_ok = value >= lo if interval[0] == "[" else value > lo
    high_ok = value <= hi if interval[-1] == "]" else value < hi
    return bool(low_ok and high_ok)


def check_ranges(cfg: dict, need: Checker) -> None:
    """Every leaf's ``interval``, and a SwiGLU width of at least 1 (a tiny ``mlp_ratio`` rounds it to 0)."""
    for key, leaf in leaves():
        value = get(cfg, key)
        if leaf.interval is None or value is None or isinstance(value, bool):
            continue
        interval = leaf.interval
        if interval.endswith("inf)"):
            lo = interval[1:].split(",")[0]
            bound = f"{'>=' if interval[0] == '[' else '>'} {lo}"
            bound += " and finite" if math.isinf(value) and value > 0 else ""
        else:
            bound = f"in {interval}"
        need(_in_interval(value, interval), f"{key} must be {bound}, got {value}")
    model = cfg["model"]
    width = ffn_width(model["hidden_size"], model["mlp_ratio"], model["multiple_of"])
    need(
        width >= 1,
        f"model.mlp_ratio {model['mlp_ratio']} gives a feed-forward width of {width} "
        f"(multiple_of * ceil(int(hidden_size {model['hidden_size']} * mlp_ratio) / multiple_of)); raise it",
    )


def check_generation(gen: dict, need: Any) -> None:
    """The ``generation`` section (``tools/generate.py``, G-01..G-06): ranges, EOS ids, and no beam search yet."""
    need(
        gen["num_beams"] == 1,
        f"generation.num_beams={gen['num_beams']}: beam search is not implemented yet; set num_beams=1 "
        "(do_sample=False decodes greedily, do_sample=True samples)",
    )
    need(gen["batch_size"] >= 1, f"generation.batch_size must be >= 1, got {gen['batch_size']}")
    need(gen["max_length"] >= 2, f"generation.max_length (prompt included) must be >= 2, got {gen['max_length']}")
    need(
        gen["temperature"] > 0,
        f"generation.temperature must be > 0, got {gen['temperature']} (for greedy decoding set do_sample=False)",
    )
    need(gen["top_k"] >= 0, f"generation.top_k must be >= 0 (0: no top-k filter), got {gen['top_k']}")
    need(0 < gen["top_p"] <= 1, f"generation.top_p must be in (0, 1] (1: no top-p filter), got {gen['top_p']}")
    need(gen["repetition_penalty"] > 0, f"generation.repetition_penalty must be > 0, got {gen['repetition_penalty']}")
    for key in ("eos_id", "additional_eos_token_list"):
        value = gen[key]
        ids = [] if value is None else [value] if isinstance(value, int) else list(value)
        need(
            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids),
            f"generation.{key} must be a token id or a list of token ids (ints >= 0), got {value!r}",
        )


def check_pipeline(config: ml_collections.ConfigDict) -> float:
    """Raises ``ConfigError`` for a pipeline layout the schedule cannot run; returns the bubble fraction.

    Needs L divisible by P x V, and with V > 1 at least P micro-batches in every step (training, rampup and
    validation), since a micro-batch re-enters stage 0 for its next chunk M iterations after it entered for the
    last one and needs P of them to get through the stages. With V = 1 fewer micro-batches than stages are correct
    but mostly bubble; the returned (P - 1) / (M·V + P - 1) lets the caller warn.
    """
    p, v, layers = config.parallel.pipeline.size, config.model.num_chunks, config.model.num_layers
    if v < 1:
        raise ConfigError(f"model.num_chunks must be >= 1, got {v}")
    if p == 1:
        return 0.0
    if layers % (p * v):
        raise ConfigError(
            f"model.num_layers {layers} is not divisible by parallel.pipeline.size {p} x model.num_chunks {v} "
            f"= {p * v}: every stage holds num_chunks chunks of equally many layers"
        )
    data = config.data
    ramp = parse_rampup(data.rampup_batch_size, data.micro_num)
    counts = {"data.micro_num": data.micro_num, "data.valid_micro_num": data.valid_micro_num}
    if ramp is not None:
        start, incr, _ = ramp
        if (data.micro_num - start) % incr:
            # InternEvo asserts this with pipelines: the ramp must land on micro_num exactly. Otherwise the step
            # that would pass micro_num is cut to it, a batch size the ramp never names.
            raise ConfigError(
                f"data.rampup_batch_size={data.rampup_batch_size!r} with parallel.pipeline.size {p}: the increment "
                f"{incr} must divide data.micro_num - start = {data.micro_num} - {start} = {data.micro_num - start} "
                f"(remainder {(data.micro_num - start) % incr}); choose start and increment so that the ramp "
                f"reaches micro_num {data.micro_num} exactly"
            )
        counts["the first step of data.rampup_batch_size"] = start
    if v > 1:
        for name, m in counts.items():
            if m < p:
                raise ConfigError(
                    f"{name}={m} < parallel.pipeline.size {p}: the interleaved schedule (model.num_chunks={v}) "
                    f"needs at least {p} micro-batches per step (a micro-batch re-enters stage 0 for its next chunk "
                    f"micro_num iterations after it entered for the last one, and takes {p} to pass the stages)"
                )
    m = data.micro_num
    return (p - 1) / (m * v + p - 1)
