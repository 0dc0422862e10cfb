"""Weight layouts: our params <-> Hugging Face folders (``config.json`` + ``*.safetensors``), a table of reshapes.

Ours (glossary of ``model.py``): ``wqkv`` [L, D, K, G + 2, H] with per-kv-group slots ``[q_0..q_{G-1}, k, v]``,
``wo`` [L, N, H, D], ``w1``/``w3`` [L, D, F] (gate/up), ``w2`` [L, F, D] (down), ``tok_embeddings`` [V, D],
``output`` [D, V]. HF stores ``nn.Linear`` weights as [out, in].

HF layouts read: ``LlamaForCausalLM`` (also InternLM1's ``InternLMForCausalLM``, which is Llama with q/k/v/o biases),
``InternLM2ForCausalLM`` (fused ``wqkv`` rows grouped per kv head exactly like ours), and the model zoo of InternEvo
v0.5 (#21): ``Qwen2ForCausalLM`` (q/k/v biases, no output bias), ``GemmaForCausalLM`` (Llama names; its ``(1 + w)``
norm weights are stored as w, like ours), ``InternLM3ForCausalLM`` (Llama names, ``qkv_bias``) and Baichuan2-7B's
``BaichuanForCausalLM`` (q/k/v rows stacked in ``W_pack``; its NormHead normalises the stored head when it runs). All
use the half-split RoPE layout; a model configured with ``qk_interleaved`` (InternEvo's ``adapt_hf=False``, Meta
layout) gets its q and k channels permuted on the way in and back on the way out. A tied head (``tie_word_embeddings``)
is the embedding table: no ``lm_head`` tensor. Export layout ``llama`` writes the ``transformers`` class that computes
the model (Llama, Qwen2 or Gemma: ``export_architecture``), which ``transformers.AutoModelForCausalLM`` loads without
``trust_remote_code``; ``internlm3`` and ``baichuan2`` write those remote-code layouts (``INTERNLM2_EXPORT`` says why
there is no InternLM2 export).

RoPE: plain, dynamic NTK (``rope_scaling`` type ``dynamic``), ``linear`` and ``llama3`` (Llama 3.1/3.2) scaling are
read and written; every other scaling type (yarn, longrope, ...) is refused with the reason, never read as plain RoPE.

InternEvo's FFN names are a known hazard (docs/internevo_parity.md#ffn-naming-hazard): some converters call the
down projection ``w3``. The down projection is therefore identified by its shape [D, F], not by its name.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.config import ConfigError, ffn_width
from internevo_jax.convert.hf_families import (  # noqa: F401 (INTERNLM1, INTERNLM2: the architecture names, here too)
    ARCHITECTURES,
    BAICHUAN,
    GEMMA,
    INTERNLM1,
    INTERNLM2,
    INTERNLM3,
    LLAMA,
    MIXTRAL,
    MODEL_TYPE_OF,
    QWEN2,
    REFUSED_ARCHITECTURES,
    activation,
    attention_biases,
)

# Export layouts: "llama" is transformers' own class for the function (LlamaForCausalLM, Qwen2ForCausalLM,
# GemmaForCausalLM or MixtralForCausalLM, see export_architecture); the others write a remote-code family's names.
LAYOUTS = {"llama": None, "internlm3": INTERNLM3, "baichuan2": BAICHUAN}
IGNORED = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed from the config
INTERNLM2_EXPORT = (
    "the InternLM2 export layout was dropped: transformers has no InternLM2 architecture, so such a folder loads only "
    "with InternLM's own remote code (modeling_internlm2.py and an auto_map), which we neither ship nor test against "
    "each transformers release. Export the Llama layout instead (--layout llama, the default): InternLM2 is the Llama "
    "architecture with a fused wqkv, and transformers loads that folder as LlamaForCausalLM with the same logits "
    "(InternLM2 Hugging Face folders are still read)"
)
# RoPE scaling types refused on import, with the reason (the rest get a generic one)
UNSUPPORTED_ROPE = {
    "yarn": "YaRN ramps between interpolated and original frequencies (beta_fast/beta_slow) and scales the attention "
    "logits (attention_factor)",
    "longrope": "LongRoPE multiplies each frequency by per-channel factor lists (short_factor/long_factor) picked by "
    "the sequence length, and scales the attention logits",
}


def make_dir_beside(folder: Path, tag: str) -> Path:
    """A new empty hidden folder ``.<folder name>.<tag><random>`` beside ``folder``, made with ``os.mkdir``'s default
    mode: the umask decides its permissions, as for our files (``tempfile.mkdtemp`` makes it 0700, and a folder
    renamed into place keeps them, so teammates could not read an export)."""
    while True:
        path = folder.parent / f".{folder.name}.{tag}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def check_layout(layout: str) -> None:
    """Raises ``ValueError`` for an export layout not in ``LAYOUTS`` (``internlm2``: with ``INTERNLM2_EXPORT``)."""
    if layout == "internlm2":
        raise ValueError(f"layout='internlm2': {INTERNLM2_EXPORT}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: exports are written in one of the layouts {list(LAYOUTS)}")


def export_architecture(model: ml_collections.ConfigDict, layout: str = "llama") -> str:
    """The HF architecture an export of the ``model`` section writes; ``ValueError`` if that class cannot compute
    the model's function.

    Layout ``llama`` picks the ``transformers`` class: ``GemmaForCausalLM`` for Gemma's pieces (``add_unit_offset``,
    ``embed_scale``, ``hidden_act='gelu_tanh'``, which come together), ``Qwen2ForCausalLM`` for q/k/v biases without
    an output bias, else ``LlamaForCausalLM``. ``internlm3`` / ``baichuan2`` write those remote-code layouts."""
    check_layout(layout)
    if model.norm_type != "rmsnorm" or model.apply_post_layer_norm:
        raise ValueError("only pre-norm RMSNorm models have a Hugging Face layout (norm_type / apply_post_layer_norm)")
    gemma = (bool(model.add_unit_offset), bool(model.embed_scale), model.hidden_act == "gelu_tanh")
    if model.num_experts > 1:
        if layout != "llama" or any(gemma) or model.moe_use_residual or model.qkv_bias or model.o_bias:
            raise ValueError(
                "a MoE model exports as MixtralForCausalLM (layout 'llama'), which has no residual MoE "
                "(model.moe_use_residual), no attention biases and none of Gemma's pieces"
            )
        return MIXTRAL
    arch = LAYOUTS[layout] or (GEMMA if any(gemma) else QWEN2 if model.qkv_bias and not model.o_bias else LLAMA)
    if arch == GEMMA and not all(gemma):
        raise ValueError(
            "model.add_unit_offset, model.embed_scale and model.hidden_act='gelu_tanh' are Gemma's and have a "
            f"Hugging Face layout only together (GemmaForCausalLM); got {gemma}"
        )
    if arch != GEMMA and any(gemma):
        raise ValueError(f"layout {layout!r} has no place for Gemma's norm/embedding/activation; use layout 'llama'")
    both = model.qkv_bias == model.o_bias
    need = {
        LLAMA: (both, "an output bias without q/k/v biases has no Hugging Face layout"),
        GEMMA: (both, "GemmaForCausalLM's attention_bias puts biases on q/k/v and the output together"),
        QWEN2: (True, ""),
        INTERNLM3: (not model.o_bias, "InternLM3's bias=True also adds MLP biases, which our model does not have"),
        BAICHUAN: (
            not model.o_bias
            and not model.qkv_bias
            and model.norm_head
            and model.num_kv_attention_heads == model.num_attention_heads
            and model.head_dim * model.num_attention_heads == model.hidden_size
            and float(model.rope_base) == 10000.0
            and hf_rope_scaling(model) is None
            and not model.tie_word_embeddings,
            "Baichuan2-7B's layout is MHA without biases, a NormHead (model.norm_head=True), head_dim = hidden / heads "
            "and plain RoPE with base 10000, untied",
        ),
    }
    ok, why = need[arch]
    if not ok:
        raise ValueError(f"the model cannot be exported as {arch}: {why}")
    if model.use_sliding_window and arch != QWEN2:
        raise ValueError(f"model.use_sliding_window is Qwen2's; {arch} has no such key")
    return arch


def hf_rope_scaling(model: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """``config.json``'s ``rope_scaling`` for the ``model`` section (None: plain RoPE); ``model_overrides`` reads it
    back to the same values."""
    factor = float(model.rope_scaling_factor)
    if model.use_dynamic_ntk_rope:
        return dict(type="dynamic", rope_type="dynamic", factor=factor)
    if model.rope_scaling_type == "linear":
        return dict(type="linear", rope_type="linear", factor=factor)
    if model.rope_scaling_type == "llama3":
        return dict(
            rope_type="llama3",
            factor=factor,
            low_freq_factor=float(model.rope_low_freq_factor),
            high_freq_factor=float(model.rope_high_freq_factor),
            original_max_position_embeddings=model.rope_original_max_position_embeddings
            or model.max_position_embeddings,
        )
    if model.rope_scaling_type is not None:
        raise ValueError(f"model.rope_scaling_type={model.rope_scaling_type!r}: None | linear | llama3")
    return None


def hf_config(model: ml_collections.ConfigDict, layout: str = "llama", dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of the equivalent HF model (its class: ``export_architecture``)."""
    arch = export_architecture(model, layout)
    common = dict(
        architectures=[arch],
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=ffn_width(model.hidden_size, model.mlp_ratio, model.multiple_of),
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_kv_attention_heads,
        rms_norm_eps=model.layer_norm_epsilon,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=bool(model.tie_word_embeddings),
        torch_dtype=dtype,
        head_dim=model.head_dim,
        hidden_act="silu",
    )
    rope = dict(rope_theta=float(model.rope_base), rope_scaling=hf_rope_scaling(model))
    if arch == QWEN2:
        window = dict(use_sliding_window=bool(model.use_sliding_window), sliding_window=model.sliding_window)
        if model.max_window_layers is not None:
            window["max_window_layers"] = model.max_window_layers
        return common | rope | window | dict(model_type="qwen2")
    if arch == GEMMA:
        act = "gelu_pytorch_tanh"
        return common | rope | dict(model_type="gemma", hidden_act=act, hidden_activation=act,
                                    attention_bias=bool(model.qkv_bias))  # fmt: skip
    if arch == INTERNLM3:
        return common | rope | dict(model_type="internlm3", qkv_bias=bool(model.qkv_bias), bias=False)
    if arch == BAICHUAN:  # RoPE base 10000 is fixed in its modelling; model_max_length is its name for the context
        return common | dict(model_type="baichuan", model_max_length=model.max_position_embeddings)
    if arch == MIXTRAL:
        experts = dict(num_local_experts=model.num_experts, num_experts_per_tok=model.moe.top_k)
        return common | rope | experts | dict(model_type="mixtral")
    return common | rope | dict(model_type="llama", attention_bias=bool(model.o_bias), mlp_bias=False)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    for holder in (hf, hf.get("rope_parameters") or {}, hf.get("rotary") or {}):
        for key in ("rope_theta", "base"):
            if key in holder:
                return float(holder[key])
    return 10000.0


def _rope_scaling(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model.*`` RoPE scaling values of an HF config: plain RoPE, dynamic NTK, ``linear`` or ``llama3``.

    The scaling is the first of ``rope_scaling`` (older configs), ``rope_parameters`` (transformers 5) and
    ``rotary`` (InternLM1) that names a type other than ``default``. Any other type raises ``ConfigError`` with the
    reason: read as plain RoPE, such a model would compute another function without a word.
    """
    values: dict[str, Any] = dict(
        use_dynamic_ntk_rope=False,
        rope_scaling_type=None,
        rope_scaling_factor=1.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=None,
    )
    for holder in (hf.get("rope_scaling"), hf.get("rope_parameters"), hf.get("rotary")):
        if not isinstance(holder, Mapping):
            continue
        kind = holder.get("rope_type") or holder.get("type")
        if kind in (None, "default"):
            continue
        break
    else:
        return values

    def need(key: str) -> Any:
        if not isinstance(holder.get(key), (int, float)) or isinstance(holder.get(key), bool):
            raise ConfigError(f"the HF config's {kind!r} RoPE scaling has no number {key!r}: {dict(holder)}")
        return holder[key]

    if kind == "dynamic":
        factor = holder.get("factor", holder.get("scaling_factor", 1.0))
        values.update(use_dynamic_ntk_rope=True, rope_scaling_factor=float(factor))
    elif kind == "linear":
        values.update(rope_scaling_type="linear", rope_scaling_factor=float(need("factor")))
    elif kind == "llama3":
        # transformers takes a top-level original_max_position_embeddings first, then the scaling's, then the max
        original = hf.get("original_max_position_embeddings") or holder.get("original_max_position_embeddings")
        values.update(
            rope_scaling_type="llama3",
            rope_scaling_factor=float(need("factor")),
            rope_low_freq_factor=float(need("low_freq_factor")),
            rope_high_freq_factor=float(need("high_freq_factor")),
            rope_original_max_position_embeddings=int(original or hf.get("max_position_embeddings", 2048)),
        )
    else:
        reason = UNSUPPORTED_ROPE.get(kind, "its frequencies or attention scale are not plain RoPE's")
        raise ConfigError(
            f"the HF config's RoPE scaling type {kind!r} is not implemented ({reason}); read as plain RoPE the model "
            "would compute another function. Implemented: linear, llama3, dynamic"
        )
    return values


def model_overrides(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model_type, model-section values)`` that make our model compute the HF model's function."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch in REFUSED_ARCHITECTURES:
        raise ConfigError(
            f"HF architecture {arch!r} is not supported: {REFUSED_ARCHITECTURES[arch]}; "
            f"supported: {list(ARCHITECTURES)}"
        )
    if arch not in ARCHITECTURES:
        raise ConfigError(f"HF architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}")
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    if not hf.get("head_dim") and hidden % heads:
        raise ConfigError(f"HF hidden_size {hidden} is not divisible by {heads} heads and there is no head_dim")
    head_dim = hf.get("head_dim") or hidden // heads
    ratio, multiple = inter / hidden, 256 if inter % 256 == 0 else 1
    if ffn_width(hidden, ratio, multiple) != inter:
        ratio = (inter + 0.5) / hidden  # int(hidden * ratio) lands exactly on inter
    qkv_bias, out_bias = attention_biases(hf, arch)
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_attention_heads=hf.get("num_key_value_heads") or heads,
        mlp_ratio=ratio,
        multiple_of=multiple,
        norm_type="rmsnorm",
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=_rope_theta(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        **_rope_scaling(hf),
        no_bias=not out_bias,
        o_bias=out_bias,
        apply_post_layer_norm=False,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        hidden_act=activation(hf, arch),
        add_unit_offset=arch == GEMMA,  # Gemma: (1 + w) norms, embeddings x sqrt(hidden)
        embed_scale=arch == GEMMA,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch == GEMMA)),  # each class's own default
        use_sliding_window=bool(arch == QWEN2 and hf.get("use_sliding_window")),
        sliding_window=hf.get("sliding_window") if arch == QWEN2 and hf.get("use_sliding_window") else None,
    )
    if arch == BAICHUAN:
        if "max_position_embeddings" not in hf:
            raise ConfigError(
                "a BaichuanForCausalLM config without max_position_embeddings is Baichuan2-13B's, which uses ALiBi "
                "position biases instead of RoPE: not implemented (Baichuan2-7B is)"
            )
        values["norm_head"] = True  # NormHead: the head's vocab rows are normalised in the forward pass
    values["num_experts"] = hf.get("num_local_experts", 1) if arch == MIXTRAL else 1
    return MODEL_TYPE_OF[arch], values


def moe_overrides(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``moe`` section that computes an HF MoE model's function: its top-k, and no capacity (HF drops nothing);
    {} for a dense model."""
    arch = (hf.get("architectures") or ["?"])[0]
    return dict(top_k=hf.get("num_experts_per_tok", 2), drop_tokens=False) if arch == MIXTRAL else {}


def check_config(
    hf: Mapping[str, Any], model: ml_collections.ConfigDict, where: str, what: str = "the Hugging Face checkpoint"
) -> None:
    """Raises ``ConfigError`` naming every ``model.*`` key that disagrees with the HF ``config.json``.

    ``what`` names the checkpoint in the message (``torch_ckpt`` checks Meta's ``params.json`` as an HF dict)."""
    try:
        _, wanted = model_overrides(hf)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    scaled = wanted["use_dynamic_ntk_rope"] or wanted["rope_scaling_type"]
    llama3_keys = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position_embeddings")
    # The biases: no_bias alone when both sides follow it (one switch), else q/k/v and output apart; nothing if equal.
    bias_keys = ("no_bias", "qkv_bias", "o_bias")
    ours_follow = model.qkv_bias == model.o_bias == (not model.no_bias)
    if (model.qkv_bias, model.o_bias) == (wanted["qkv_bias"], wanted["o_bias"]):
        compared_biases: tuple[str, ...] = ()
    elif ours_follow and wanted["qkv_bias"] == wanted["o_bias"]:
        compared_biases = ("no_bias",)
    else:
        compared_biases = ("qkv_bias", "o_bias")
    bad, fix = [], []
    for key, value in wanted.items():
        ours = model[key]
        if key == "multiple_of" or (key == "rope_scaling_factor" and not scaled):
            continue
        if key == "tie_word_embeddings" and value and not ours:  # the tied head is copied into our own head
            continue
        if key in bias_keys and key not in compared_biases:
            continue
        if key == "sliding_window" and not wanted["use_sliding_window"]:
            continue  # a window not in use is not compared
        if key == "head_dim" and (ours * model.num_attention_heads, value * wanted["num_attention_heads"]) == (
            model.hidden_size,
            wanted["hidden_size"],
        ):
            continue  # both are hidden_size / heads: a difference is reported by those keys
        if key in llama3_keys and wanted["rope_scaling_type"] != "llama3":
            continue
        if key == "rope_original_max_position_embeddings":
            ours = ours or model.max_position_embeddings  # None means max_position_embeddings
        keys: tuple[str, ...] = (key,)
        if key == "mlp_ratio":  # compare what the ratio means, the FFN width
            keys = ("mlp_ratio", "multiple_of")
            key, value, ours = (
                "ffn width",
                hf["intermediate_size"],
                ffn_width(model.hidden_size, ours, model.multiple_of),
            )
        same = math.isclose(ours, value, rel_tol=1e-9) if isinstance(value, float) else ours == value
        if not same:
            bad.append(f"model.{key}={ours!r} but {where} has {value!r}")
            fix += [f"--config.model.{k}={wanted[k]!r}" for k in keys]
    if bad:
        raise ConfigError(
            f"the config and {what} disagree:\n  "
            + "\n  ".join(bad)
            + f"\nfix the config, or override: {' '.join(fix)}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# RoPE channel layouts
# ---------------------------------------------------------------------------------------------------------------------
