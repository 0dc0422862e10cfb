"""Weight layouts: our params <-> Hugging Face folders (``config.json`` + ``*.safetensors``), a table of reshapes.

Ours (glossary of ``model.py``): ``wqkv`` [L, D, K, G + 2, H] with per-kv-group slots ``[q_0..q_{G-1}, k, v]``,
``wo`` [L, N, H, D], ``w1``/``w3`` [L, D, F] (gate/up), ``w2`` [L, F, D] (down), ``tok_embeddings`` [V, D],
``output`` [D, V]. HF stores ``nn.Linear`` weights as [out, in].

HF layouts read: ``LlamaForCausalLM`` (also InternLM1's ``InternLMForCausalLM``, which is Llama with q/k/v/o biases)
and ``InternLM2ForCausalLM`` (fused ``wqkv`` rows grouped per kv head exactly like ours). Both use the half-split
RoPE layout; a model configured with ``qk_interleaved`` (InternEvo's ``adapt_hf=False``, Meta layout) gets its q and
k channels permuted on the way in and back on the way out. Export writes the Llama layout only, which
``transformers.AutoModelForCausalLM`` loads without ``trust_remote_code`` (``INTERNLM2_EXPORT`` says why there is no
InternLM2 export).

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

LLAMA, INTERNLM1, INTERNLM2 = "LlamaForCausalLM", "InternLMForCausalLM", "InternLM2ForCausalLM"
MIXTRAL = "MixtralForCausalLM"  # Llama blocks with top-k routed experts (our MIXTRALMOE)
ARCHITECTURES = (LLAMA, INTERNLM1, INTERNLM2, MIXTRAL)
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
    """Raises ``ValueError`` for an export layout other than ``llama`` (``internlm2``: with ``INTERNLM2_EXPORT``)."""
    if layout == "internlm2":
        raise ValueError(f"layout='internlm2': {INTERNLM2_EXPORT}")
    if layout != "llama":
        raise ValueError(f"layout={layout!r}: exports are written in the 'llama' layout")


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
    """``config.json`` of the equivalent HF model (Llama layout; ``layout`` is checked by ``check_layout``)."""
    check_layout(layout)
    if model.norm_type != "rmsnorm" or model.apply_post_layer_norm:
        raise ValueError("only pre-norm RMSNorm models have a Hugging Face layout (norm_type / apply_post_layer_norm)")
    moe = dict(architectures=[LLAMA], model_type="llama")
    if model.num_experts > 1:
        if model.moe_use_residual or not model.no_bias:
            raise ValueError(
                "a MoE model exports as MixtralForCausalLM, which has no residual MoE (model.moe_use_residual) and no "
                "attention biases (model.no_bias)"
            )
        moe = dict(
            architectures=[MIXTRAL],
            model_type="mixtral",
            num_local_experts=model.num_experts,
            num_experts_per_tok=model.moe.top_k,
        )
    return dict(
        **moe,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=ffn_width(model.hidden_size, model.mlp_ratio, model.multiple_of),
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_kv_attention_heads,
        rms_norm_eps=model.layer_norm_epsilon,
        rope_theta=float(model.rope_base),
        max_position_embeddings=model.max_position_embeddings,
        rope_scaling=hf_rope_scaling(model),
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype=dtype,
        head_dim=model.hidden_size // model.num_attention_heads,
        attention_bias=not model.no_bias,
        mlp_bias=False,
    )


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
    if arch not in ARCHITECTURES:
        raise ConfigError(f"HF architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}")
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(f"HF head_dim {head_dim} x {heads} heads != hidden_size {hidden}; not supported")
    ratio, multiple = inter / hidden, 256 if inter % 256 == 0 else 1
    if ffn_width(hidden, ratio, multiple) != inter:
        ratio = (inter + 0.5) / hidden  # int(hidden * ratio) lands exactly on inter
    bias = hf.get("attention_bias", hf.get("bias", arch == INTERNLM1))
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
        no_bias=not bias,
        apply_post_layer_norm=False,
    )
    values["num_experts"] = hf.get("num_local_experts", 1) if arch == MIXTRAL else 1
    model_type = {LLAMA: "LLAMA2", INTERNLM1: "INTERNLM", INTERNLM2: "INTERNLM2_PUBLIC", MIXTRAL: "MIXTRALMOE"}[arch]
    return model_type, values


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
    bad, fix = [], []
    for key, value in wanted.items():
        ours = model[key]
        if key == "multiple_of" or (key == "rope_scaling_factor" and not scaled):
            continue
        if key in llama3_keys and wanted["rope_scaling_type"] != "llama3":
            continue
        if key == "rope_original_max_position_embeddings":
            ours = ours or model.max_position_embeddings  # None means max_position_embeddings
        keys = (key,)
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
