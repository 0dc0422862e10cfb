"""Checks across fields, one function per section, and the derived values they fill in.

Each ``check_*`` takes the plain dict of its section (the whole config where a check spans sections) and ``need``, a
``Checker`` that raises ``ConfigError`` naming where the offending value came from. ``finalize`` runs them in order;
``check_pipeline`` runs on the locked config (the pipeline schedule's own constraints).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from internevo_jax.config.ckpt_keys import check_ckpt
from internevo_jax.config.errors import Checker, ConfigError
from internevo_jax.config.merge import get
from internevo_jax.config.parsers import parse_rampup, parse_skip_batches
from internevo_jax.config.schema import (
    ATTN_IMPLS,
    DATA_TYPES,
    DTYPES,
    MODEL_TYPES,
    MOE_TYPES,
    NOISY_GATE_POLICIES,
    REMAT_POLICIES,
    TENSOR_MODES,
    ffn_width,
    is_moe_model_type,
    leaves,
)
from internevo_jax.config.unsupported import check_unsupported


def finalize(cfg: dict, need: Checker, given: set[str] = frozenset()) -> None:
    """Fills derived values and checks across fields; ``given``: the dotted keys the file or an override set."""
    check_data(cfg["data"], need)
    check_model_type(cfg["model_type"], need)
    check_ranges(cfg, need)  # before anything divides by a size
    check_model(cfg["model"], cfg["model_type"], need)
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


def check_model_type(model_type: str, need: Checker) -> None:
    """A known ``model_type`` (``MODEL_TYPES``: the built-in ones and those registered since)."""
    need(
        model_type in MODEL_TYPES or not is_moe_model_type(model_type),
        f"model_type={model_type!r}: this mixture-of-experts (MoE) family is not implemented; MoE model types: "
        f"{sorted(t for t in MODEL_TYPES if is_moe_model_type(t))} (INTERNLM_MoE: InternLM1 blocks; MIXTRALMOE: "
        "Llama blocks)",
    )
    need(
        model_type in MODEL_TYPES,
        f"model_type={model_type!r} is unknown; registered: {sorted(MODEL_TYPES)} (add yours with "
        "internevo_jax.register_model before loading the config)",
    )


def check_model(model: dict, model_type: str, need: Checker) -> None:
    """The ``model`` section: names from fixed choices, shapes that divide, the model type's own defaults filled."""
    need(model["dtype"] in DTYPES, f"model.dtype={model['dtype']!r} is unknown; valid: {sorted(DTYPES)}")
    ckpt_frac = model["checkpoint"]
    model["checkpoint"] = float(ckpt_frac)
    need(
        0.0 <= model["checkpoint"] <= 1.0,
        f"model.checkpoint must be True/False or a fraction in [0, 1], got {ckpt_frac}",
    )
    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    need(hidden % heads == 0, f"model.hidden_size {hidden} is not divisible by model.num_attention_heads {heads}")
    if model["num_kv_attention_heads"] is None:
        model["num_kv_attention_heads"] = heads
    kv = model["num_kv_attention_heads"]
    need(heads % kv == 0, f"model.num_attention_heads {heads} is not divisible by model.num_kv_attention_heads {kv}")
    need(
        (hidden // heads) % 2 == 0, f"head dim {hidden // heads} (hidden_size/num_attention_heads) must be even (RoPE)"
    )
    need(model["norm_type"] in ("rmsnorm", "layernorm"), f"model.norm_type={model['norm_type']!r}: rmsnorm | layernorm")
    need(model["attn_impl"] in ATTN_IMPLS, f"model.attn_impl={model['attn_impl']!r} is unknown; valid: {ATTN_IMPLS}")
    need(
        model["remat_policy"] in REMAT_POLICIES,
        f"model.remat_policy={model['remat_policy']!r} is unknown; valid: {REMAT_POLICIES}",
    )
    need(model["init_type"] in ("normal", "uniform"), f"model.init_type={model['init_type']!r}: normal | uniform")
    _check_moe(model, model_type, need)
    # INTERNLM_MoE is InternLM1 with MoE MLPs: its biases, layout and init; MIXTRALMOE is Llama's in the HF layout.
    family = "INTERNLM" if model_type == "INTERNLM_MoE" else model_type
    if model["no_bias"] is None:
        model["no_bias"] = family != "INTERNLM"
    _resolve_rope_layout(model, family, need)
    _check_rope_scaling(model, need)
    for key in ("drop_rate", "attn_drop_rate"):
        need(0.0 <= model[key] < 1.0, f"model.{key} must be in [0, 1), got {model[key]}")
    need(
        not model["attn_drop_rate"] or model["attn_impl"] in ("xla", "auto"),
        f"model.attn_drop_rate > 0 needs model.attn_impl='xla' (got {model['attn_impl']!r})",
    )
    need(model["attn_max_segments"] >= 1, "model.attn_max_segments must be >= 1")
    need(
        model["rope_scaling_factor"] >= 1.0,
        f"model.rope_scaling_factor must be >= 1, got {model['rope_scaling_factor']}",
    )
    need(model["max_position_embeddings"] >= 1, "model.max_position_embeddings must be >= 1")
    std = 0.0052 if family == "INTERNLM" else 0.02
    for key in ("embedding_init_std", "out_head_init_std"):
        model[key] = std if model[key] is None else model[key]
    std = 0.006 if family == "INTERNLM" else 0.02
    for key in ("attn_wqkv_init_std", "attn_other_init_std", "ffn_uplayer_init_std", "ffn_other_init_std"):
        model[key] = std if model[key] is None else model[key]


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


def _check_rope_scaling(model: dict, need: Any) -> None:
    """``model.rope_scaling_type`` and its keys (the math: ``model.RopeScaling``)."""
    kind = model["rope_scaling_type"]
    need(
        kind in (None, "linear", "llama3"),
        f"model.rope_scaling_type={kind!r} is not implemented; valid: None (plain RoPE, or dynamic NTK with "
        "model.use_dynamic_ntk_rope=True), 'linear', 'llama3'",
    )
    need(
        not (kind and model["use_dynamic_ntk_rope"]),
        f"model.rope_scaling_type={kind!r} and model.use_dynamic_ntk_rope=True are two RoPE scalings; set one",
    )
    low, high, original = (
        model[f"rope_{k}"] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    )
    need(
        0 < low < high,
        f"model.rope_low_freq_factor ({low}) and model.rope_high_freq_factor ({high}) need 0 < low < high",
    )
    need(
        original is None or (isinstance(original, int) and not isinstance(original, bool) and original >= 1),
        f"model.rope_original_max_position_embeddings must be None or an int >= 1, got {original!r}",
    )


def _check_moe(model: dict, model_type: str, need: Checker) -> None:
    """``num_experts > 1`` only with a MoE model type, and the ``moe`` section's choices (a copy rides in
    ``model.moe`` so the model reads only its own section)."""
    experts, moe = model["num_experts"], model["moe"]
    need(
        experts == 1 or is_moe_model_type(model_type),
        f"model.num_experts={experts} needs a mixture-of-experts model_type (got {model_type!r}): set "
        "model_type='INTERNLM_MoE' (InternLM1 blocks) or 'MIXTRALMOE' (Llama blocks), or num_experts=1",
    )
    if experts == 1:
        return
    need(
        model["moe_type"] in MOE_TYPES,
        f"model.moe_type={model['moe_type']!r} is not implemented; valid: {MOE_TYPES} (MegaBlock-D is the dropless "
        "grouped-GEMM path; InternEvo's MegaBlock, capacity-based like GShard, is not)",
    )
    need(moe["top_k"] in (1, 2), f"moe.top_k={moe['top_k']!r}: InternEvo's GShard gating is top-1 or top-2")
    need(
        moe["noisy_gate_policy"] in NOISY_GATE_POLICIES,
        f"moe.noisy_gate_policy={moe['noisy_gate_policy']!r} is unknown; valid: {NOISY_GATE_POLICIES}",
    )
    if moe["noisy_gate_policy"] == "None":
        moe["noisy_gate_policy"] = None


def _resolve_rope_layout(model: dict, model_type: str, need: Any) -> None:
    """Fills ``adapt_hf`` and ``qk_interleaved`` (one switch under two names) from each other and the model type."""
    if model_type == "INTERNLM":  # InternLM1 has only the half-split layout; InternEvo ignores adapt_hf there
        need(not model["qk_interleaved"], "model.qk_interleaved=True: INTERNLM has only the half-split RoPE layout")
        model["adapt_hf"], model["qk_interleaved"] = True, False
        return
    adapt, inter = model["adapt_hf"], model["qk_interleaved"]
    if adapt is not None and inter is not None:
        need(
            adapt != inter,
            f"model.adapt_hf={adapt} and model.qk_interleaved={inter} contradict (qk_interleaved = not adapt_hf); "
            "set only one of them",
        )
    elif inter is not None:
        adapt = not inter
    elif adapt is None:
        adapt = model_type != "LLAMA2"
    model["adapt_hf"], model["qk_interleaved"] = bool(adapt), not adapt


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
