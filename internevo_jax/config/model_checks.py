"""The ``model`` section's checks: the model type, shapes that divide, each family's own defaults (biases, norms,
activation, embeddings, head), mixture-of-experts choices, the RoPE layout and scaling."""

from __future__ import annotations

from typing import Any

from internevo_jax.config.errors import Checker
from internevo_jax.config.schema import (
    ATTN_IMPLS,
    DTYPES,
    MODEL_TYPES,
    MOE_TYPES,
    NOISY_GATE_POLICIES,
    REMAT_POLICIES,
    is_moe_model_type,
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
    if model["head_dim"] is None:
        need(
            hidden % heads == 0,
            f"model.hidden_size {hidden} is not divisible by model.num_attention_heads {heads} (or set model.head_dim)",
        )
        model["head_dim"] = hidden // heads
    if model["num_kv_attention_heads"] is None:
        model["num_kv_attention_heads"] = heads
    kv = model["num_kv_attention_heads"]
    need(heads % kv == 0, f"model.num_attention_heads {heads} is not divisible by model.num_kv_attention_heads {kv}")
    need(model["head_dim"] % 2 == 0, f"model.head_dim {model['head_dim']} must be even (RoPE)")
    need(model["norm_type"] in ("rmsnorm", "layernorm"), f"model.norm_type={model['norm_type']!r}: rmsnorm | layernorm")
    # INTERNLM_MoE is InternLM1 with MoE MLPs: its biases, layout and init; MIXTRALMOE is Llama's in the HF layout.
    family = "INTERNLM" if model_type == "INTERNLM_MoE" else model_type
    _fill_family_defaults(model, family, need)
    need(model["attn_impl"] in ATTN_IMPLS, f"model.attn_impl={model['attn_impl']!r} is unknown; valid: {ATTN_IMPLS}")
    need(
        model["remat_policy"] in REMAT_POLICIES,
        f"model.remat_policy={model['remat_policy']!r} is unknown; valid: {REMAT_POLICIES}",
    )
    need(model["init_type"] in ("normal", "uniform"), f"model.init_type={model['init_type']!r}: normal | uniform")
    _check_moe(model, model_type, need)
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


# What each model type sets of the keys whose default is None ("the model type's own default"); a key a family does
# not name takes GENERIC_DEFAULTS' value (qkv_bias and o_bias: not no_bias). Each family is the one decoder configured
# so (README, model table).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "INTERNLM": dict(no_bias=False),  # q/k/v and output biases
    "QWEN2": dict(qkv_bias=True, o_bias=False),  # q/k/v biases, no output bias
    "GEMMA": dict(hidden_act="gelu_tanh", add_unit_offset=True, embed_scale=True, tie_word_embeddings=True),
    "BAICHUAN2": dict(norm_head=True),  # NormHead: unit-norm vocab rows
}
GENERIC_DEFAULTS: dict[str, Any] = dict(
    no_bias=True,
    hidden_act="silu",
    add_unit_offset=False,
    embed_scale=False,
    tie_word_embeddings=False,
    norm_head=False,
)
HIDDEN_ACTS = ("silu", "gelu_tanh")


def _fill_family_defaults(model: dict, model_type: str, need: Checker) -> None:
    """Fills the None keys from ``FAMILY_DEFAULTS`` (then ``GENERIC_DEFAULTS``; the biases follow ``no_bias``)."""
    family = FAMILY_DEFAULTS.get(model_type, {})
    for key, value in GENERIC_DEFAULTS.items():
        if model[key] is None:
            model[key] = family.get(key, value)
    for key in ("qkv_bias", "o_bias"):
        if model[key] is None:
            model[key] = family.get(key, not model["no_bias"])
    act = model["hidden_act"]
    need(act in HIDDEN_ACTS, f"model.hidden_act={act!r} is unknown; valid: {HIDDEN_ACTS}")
    need(
        not (model["tie_word_embeddings"] and model["norm_head"]),
        "model.tie_word_embeddings=True and model.norm_head=True: a tied head is the embedding table itself and "
        "cannot be normalised separately; set one of them",
    )
    need(
        model["norm_type"] == "rmsnorm" or not model["add_unit_offset"],
        "model.add_unit_offset=True (Gemma's (1 + weight) scale) needs model.norm_type='rmsnorm'",
    )


def check_sliding_window(model: dict, data: dict, need: Checker) -> None:
    """``model.use_sliding_window`` (InternEvo v0.5 / HF Qwen2) is accepted only where it changes nothing: a window at
    least ``data.seq_len`` long, which no packed document is longer than. A shorter window is not implemented."""
    window = model["sliding_window"]
    need(
        not model["use_sliding_window"] or (window is not None and window >= data["seq_len"]),
        f"model.use_sliding_window=True with model.sliding_window={window} < data.seq_len={data['seq_len']}: "
        "sliding-window attention is not implemented (every token attends to its whole document); set "
        "model.use_sliding_window=False or a window >= data.seq_len",
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
