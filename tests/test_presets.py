"""Preset configs for the published model sizes: they load, and their models have the released parameter counts.

Counts come from ``jax.eval_shape`` of the model (shapes only, nothing allocated), so a 20B check is instant.
"""

from typing import NamedTuple

import jax
import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.model import build_model

from .conftest import ROOT


class Preset(NamedTuple):
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_base: float
    seq_len: int
    qkvo_bias: bool
    published: int  # parameter count of the released HF checkpoint
    qkv_bias: bool | None = None  # None: as qkvo_bias (Qwen2: q/k/v biases without an output bias)
    head_dim: int | None = None  # None: hidden / heads (Gemma: 256)
    tied: bool = False  # the head is the embedding table (small Qwen2, Gemma)


PRESETS = {
    "llama2_7b": Preset("LLAMA2", 4096, 32, 32, 32, 11008, 32000, 10000, 4096, False, 6_738_415_616),
    "llama3_8b": Preset("LLAMA2", 4096, 32, 32, 8, 14336, 128256, 500_000, 8192, False, 8_030_261_248),
    "internlm2_1_8b": Preset("INTERNLM2_PUBLIC", 2048, 24, 16, 8, 8192, 92544, 1e6, 4096, False, 1_889_110_016),
    "internlm2_7b": Preset("INTERNLM2_PUBLIC", 4096, 32, 32, 8, 14336, 92544, 1e6, 4096, False, 7_737_708_544),
    "internlm2_20b": Preset("INTERNLM2_PUBLIC", 6144, 48, 48, 8, 16384, 92544, 1e6, 4096, False, 19_861_149_696),
    # A figure sometimes quoted for InternLM-7B, 7,321,034,752, matches no InternLM-7B layout: it is
    # 913,408 (= 223 * 4096) short of the count below and would need vocab 103,056 (with biases) or a fractional
    # vocab (without). The HF config (h4096, 32 layers, ffn 11008, vocab 103168, bias=True on q/k/v/o) gives
    # 2*103168*4096 + 32*(4*4096^2 + 4*4096 + 3*4096*11008 + 2*4096) + 4096 = 7,321,948,160; we test that.
    "internlm_7b": Preset("INTERNLM", 4096, 32, 32, 32, 11008, 103168, 10000, 4096, True, 7_321_948_160),
    # The model zoo of InternEvo v0.5 (#21); the counts are the HF checkpoints' (safetensors total_size / 2 in bf16).
    "qwen2_7b": Preset("QWEN2", 3584, 28, 28, 4, 18944, 152064, 1e6, 4096, False, 7_615_616_512, qkv_bias=True),
    "qwen2_5_0_5b": Preset(
        "QWEN2", 896, 24, 14, 2, 4864, 151936, 1e6, 4096, False, 494_032_768, qkv_bias=True, tied=True
    ),
    "gemma_7b": Preset("GEMMA", 3072, 28, 16, 16, 24576, 256000, 10000, 4096, False, 8_537_680_896, None, 256, True),
    "gemma_2b": Preset("GEMMA", 2048, 18, 8, 1, 16384, 256000, 10000, 4096, False, 2_506_172_416, None, 256, True),
    "internlm3_8b": Preset("INTERNLM3", 4096, 48, 32, 2, 10240, 128512, 5e7, 4096, False, 8_804_241_408),
    "baichuan2_7b": Preset("BAICHUAN2", 4096, 32, 32, 32, 11008, 125696, 10000, 4096, False, 7_505_973_248),
}


def hand_count(p: Preset) -> int:
    """The parameter count written out from the architecture (M-14), independent of the model code."""
    head_dim = p.head_dim or p.hidden // p.heads
    q, kv = p.heads * head_dim, p.kv_heads * head_dim
    attention = p.hidden * (q + 2 * kv) + q * p.hidden  # wq, wk, wv, wo
    if p.qkvo_bias or p.qkv_bias:
        attention += q + 2 * kv
    if p.qkvo_bias:
        attention += p.hidden
    ffn = 3 * p.hidden * p.ffn  # SwiGLU/GeGLU w1 (gate), w3 (up), w2 (down)
    norms = 2 * p.hidden  # attention_norm, ffn_norm (RMSNorm: weight only)
    tables = (1 if p.tied else 2) * p.vocab * p.hidden  # embedding, and the head unless it is the embedding
    return tables + p.layers * (attention + ffn + norms) + p.hidden  # + final norm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_with_the_published_architecture(name):
    p = PRESETS[name]
    cfg = config_lib.load(ROOT / "configs" / f"{name}.py")
    m = cfg.model
    assert cfg.model_type == p.model_type and cfg.JOB_NAME == name
    assert (m.hidden_size, m.num_layers, m.vocab_size) == (p.hidden, p.layers, p.vocab)
    assert (m.num_attention_heads, m.num_kv_attention_heads) == (p.heads, p.kv_heads)
    assert config_lib.ffn_width(m.hidden_size, m.mlp_ratio, m.multiple_of) == p.ffn
    assert m.rope_base == p.rope_base and m.no_bias == (not p.qkvo_bias) and m.norm_type == "rmsnorm"
    # Training settings every preset shares: bf16 compute, recompute, ZeRO over all data ranks, dummy data for now.
    assert m.dtype == "torch.bfloat16" and m.checkpoint > 0
    assert cfg.data.seq_len == p.seq_len and cfg.data.train_folder is None
    assert cfg.parallel.zero1.size == -1 and cfg.parallel.tensor.size == 1 and cfg.parallel.pipeline.size == 1
    assert cfg.ckpt.save_ckpt_folder == f"local:RUN/{name}/ckpt"
    assert cfg.lr_scheduler.total_steps == cfg.data.total_steps


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_the_released_checkpoint(name):
    p = PRESETS[name]
    cfg = config_lib.load(ROOT / "configs" / f"{name}.py")
    model = nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert hand_count(p) == p.published
    assert count == p.published, f"{name}: model has {count:,} params, released checkpoint {p.published:,}"

    # The shapes behind the count: fused GQA wqkv [L, D, K, G + 2, H] and the SwiGLU width.
    head_dim = p.head_dim or p.hidden // p.heads
    layers = model.layers
    assert layers.attention.wqkv.shape == (p.layers, p.hidden, p.kv_heads, p.heads // p.kv_heads + 2, head_dim)
    assert layers.attention.wo.shape == (p.layers, p.heads, head_dim, p.hidden)
    assert layers.feed_forward.w1.shape == (p.layers, p.hidden, p.ffn)
    assert layers.feed_forward.w2.shape == (p.layers, p.ffn, p.hidden)
    assert model.tok_embeddings.shape == (p.vocab, p.hidden)
    assert (model.output.shape if hasattr(model, "output") else None) == (None if p.tied else (p.hidden, p.vocab))
    assert hasattr(layers.attention, "bqkv") == bool(p.qkvo_bias or p.qkv_bias)
    assert hasattr(layers.attention, "bo") == p.qkvo_bias


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_takes_its_architecture_from_its_base_file(name):
    """Each preset imports ``configs/_base_/models/<name>.py`` InternEvo's way (``with read_base():``); the base file
    alone holds the architecture, so a new config for the same model imports it instead of copying numbers."""
    preset = ROOT / "configs" / f"{name}.py"
    assert f"from configs._base_.models.{name} import *" in preset.read_text()
    base = config_lib.read_config_file(ROOT / "configs" / "_base_" / "models" / f"{name}.py")
    cfg = config_lib.load(preset)
    assert cfg.model_type == base["model_type"]
    assert {k: cfg.model[k] for k in base["model"]} == base["model"]
    assert {k: cfg[k] for k in base if k.isupper()} == {k: v for k, v in base.items() if k.isupper()}
