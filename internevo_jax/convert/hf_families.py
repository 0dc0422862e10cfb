"""The Hugging Face architectures we read, by family: their class names, our model types, the ones refused with the
reason, and the two config.json readings that differ by family (attention biases, MLP activation). ``hf_config.py``
turns a ``config.json`` into our ``model`` section with them; the weight layouts are ``hf_layout.py``'s and
``hf_folder.py``'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from internevo_jax.config import ConfigError

LLAMA, INTERNLM1, INTERNLM2 = "LlamaForCausalLM", "InternLMForCausalLM", "InternLM2ForCausalLM"
QWEN2, GEMMA = "Qwen2ForCausalLM", "GemmaForCausalLM"  # the model zoo of InternEvo v0.5 (#21), in transformers
INTERNLM3, BAICHUAN = "InternLM3ForCausalLM", "BaichuanForCausalLM"  # remote code on the hub, not in transformers
MIXTRAL = "MixtralForCausalLM"  # Llama blocks with top-k routed experts (our MIXTRALMOE)
ARCHITECTURES = (LLAMA, INTERNLM1, INTERNLM2, QWEN2, GEMMA, INTERNLM3, BAICHUAN, MIXTRAL)
MODEL_TYPE_OF = {
    LLAMA: "LLAMA2",
    INTERNLM1: "INTERNLM",
    INTERNLM2: "INTERNLM2_PUBLIC",
    QWEN2: "QWEN2",
    GEMMA: "GEMMA",
    INTERNLM3: "INTERNLM3",
    BAICHUAN: "BAICHUAN2",
    MIXTRAL: "MIXTRALMOE",
}
# Architectures refused with the reason (the rest get the list of supported ones)
REFUSED_ARCHITECTURES = {
    "Gemma2ForCausalLM": "Gemma 2 soft-caps the attention and the final logits with tanh, alternates sliding-window "
    "(4096) and global attention layer by layer, adds norms after attention and after the MLP and scales queries by "
    "query_pre_attn_scalar; none of that is implemented (Gemma 1, GemmaForCausalLM, is)",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> model.hidden_act


def attention_biases(hf: Mapping[str, Any], arch: str) -> tuple[bool, bool]:
    """``(q/k/v biases, output bias)`` of an HF config."""
    if arch == QWEN2:
        return True, False
    if arch == BAICHUAN:
        return False, False
    if arch == INTERNLM3:
        if hf.get("bias"):
            raise ConfigError(
                "InternLM3 config bias=True puts biases on o_proj and the MLP projections too, which our model has "
                "no place for; only qkv_bias is supported"
            )
        return bool(hf.get("qkv_bias", False)), False
    bias = bool(hf.get("attention_bias", hf.get("bias", arch == INTERNLM1)))
    return bias, bias


def activation(hf: Mapping[str, Any], arch: str) -> str:
    """``model.hidden_act`` for the HF config's MLP activation (Gemma's ``hidden_activation`` first, as HF reads it)."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if arch == GEMMA and act == "gelu":
        raise ConfigError(
            "a GemmaForCausalLM config with hidden_act='gelu' and no hidden_activation: exact GELU is not Gemma's "
            "tanh-approximate GELU; set hidden_activation='gelu_pytorch_tanh' in config.json if the checkpoint is Gemma"
        )
    if act not in ACTIVATIONS:
        raise ConfigError(f"HF hidden_act {act!r} is not implemented; implemented: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]
