"""Weight layouts: our params <-> Hugging Face ``LlamaForCausalLM`` (a table of reshapes, not renames).

Ours (glossary of ``model.py``): ``wqkv`` [L, D, K, G + 2, H] with per-kv-group slots ``[q_0..q_{G-1}, k, v]``,
``wo`` [L, N, H, D], ``w1``/``w3`` [L, D, F] (gate/up), ``w2`` [L, F, D] (down), ``tok_embeddings`` [V, D],
``output`` [D, V]. HF stores ``nn.Linear`` weights as [out, in]. Both use half-split (rotate_half) RoPE, so no
channel permutation is needed for this direction.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from internevo_jax.config import ffn_width


def hf_llama_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.json`` fields of the equivalent ``LlamaForCausalLM``."""
    if model.norm_type != "rmsnorm" or model.apply_post_layer_norm:
        raise ValueError("only pre-norm RMSNorm models map onto LlamaForCausalLM")
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=ffn_width(model.hidden_size, model.mlp_ratio, model.multiple_of),
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_kv_attention_heads,
        head_dim=model.hidden_size // model.num_attention_heads,
        rms_norm_eps=model.layer_norm_epsilon,
        rope_theta=float(model.rope_base),
        max_position_embeddings=model.max_position_embeddings,
        attention_bias=not model.no_bias,
        mlp_bias=False,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def to_hf_llama(params: dict, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our pure-dict params -> an HF Llama state dict of numpy arrays (same dtype)."""
    n, k = model.num_attention_heads, model.num_kv_attention_heads
    g, hd, d = n // k, model.hidden_size // n, model.hidden_size
    layers = params["layers"]
    wqkv = np.asarray(layers["attention"]["wqkv"])  # [L, D, K, G + 2, H]
    out = {
        "model.embed_tokens.weight": np.asarray(params["tok_embeddings"]),
        "model.norm.weight": np.asarray(params["norm"]["weight"]),
        "lm_head.weight": np.asarray(params["output"]).T,
    }
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        q = wqkv[i, :, :, :g, :].reshape(d, n * hd)  # head n = kv * G + g, as HF's repeat_kv groups them
        out[p + "self_attn.q_proj.weight"] = q.T
        out[p + "self_attn.k_proj.weight"] = wqkv[i, :, :, g, :].reshape(d, k * hd).T
        out[p + "self_attn.v_proj.weight"] = wqkv[i, :, :, g + 1, :].reshape(d, k * hd).T
        out[p + "self_attn.o_proj.weight"] = np.asarray(layers["attention"]["wo"][i]).reshape(n * hd, d).T
        if not model.no_bias:
            b = np.asarray(layers["attention"]["bqkv"][i])  # [K, G + 2, H]
            out[p + "self_attn.q_proj.bias"] = b[:, :g].reshape(n * hd)
            out[p + "self_attn.k_proj.bias"] = b[:, g].reshape(k * hd)
            out[p + "self_attn.v_proj.bias"] = b[:, g + 1].reshape(k * hd)
            out[p + "self_attn.o_proj.bias"] = np.asarray(layers["attention"]["bo"][i])
        ff = layers["feed_forward"]
        out[p + "mlp.gate_proj.weight"] = np.asarray(ff["w1"][i]).T
        out[p + "mlp.up_proj.weight"] = np.asarray(ff["w3"][i]).T
        out[p + "mlp.down_proj.weight"] = np.asarray(ff["w2"][i]).T
        out[p + "input_layernorm.weight"] = np.asarray(layers["attention_norm"]["weight"][i])
        out[p + "post_attention_layernorm.weight"] = np.asarray(layers["ffn_norm"]["weight"][i])
    return {name: np.ascontiguousarray(a) for name, a in out.items()}
