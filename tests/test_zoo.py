"""The model zoo of InternEvo v0.5 (#21): QWEN2, GEMMA, INTERNLM3 and BAICHUAN2 as configurations of the one decoder,
each equal to its reference in fp32 on a tiny random model.

QWEN2 and GEMMA are checked against ``transformers`` (``Qwen2ForCausalLM``, ``GemmaForCausalLM``). INTERNLM3 and
BAICHUAN2 are remote code on the Hugging Face hub (``modeling_internlm3.py`` of internlm/internlm3-8b-instruct,
``modeling_baichuan.py`` of baichuan-inc/Baichuan2-7B-Base), not part of ``transformers``: their reference here is
``reference_logits``, the decoder those files publish written out from its formulas in torch (no code of theirs).

The HF weights reach our params through ``hf_folder.load_hf`` (the import path users take), so each test also checks
the family's HF layout; the round trips are bit-exact.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax.config import ConfigError
from internevo_jax.convert import hf_config, hf_folder, hf_layout
from internevo_jax.model import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from .conftest import ROOT  # noqa: E402

T = 24
VOCAB, HIDDEN, FFN = 256, 64, 256  # the tiny config's sizes (ffn_width(64, 2) = 256)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def nudge(model, seed=0):
    """Moves every weight off its init (norms off 1 or 0, biases off 0) so each mapping matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def packed_inputs(seed=0):
    """Row 0: one sequence of T tokens; row 1: two packed documents [0, 10) and [10, T), positions restarting."""
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (2, T), 0, VOCAB))
    cut = np.arange(T) < 10
    positions = np.stack([np.arange(T), np.where(cut, np.arange(T), np.arange(T) - 10)])
    segments = np.stack([np.ones(T, np.int32), np.where(cut, 1, 2)])
    return tokens, positions, segments


def ours(cfg, params):
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    return model


def hf_state_to_params(sd, cfg):
    """An HF state dict (Llama-style names; Baichuan's fused ``W_pack``) -> our pure-dict params, written out here
    independently of the ``convert`` package so the model is checked on its own."""
    m = cfg.model
    n, k, d, hd = m.num_attention_heads, m.num_kv_attention_heads, m.hidden_size, m.head_dim
    g = n // k
    sd = {name: t.detach().float().numpy() for name, t in sd.items()}
    per_layer: dict[str, list] = {}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        if p + "self_attn.W_pack.weight" in sd:
            wq, wk, wv = np.split(sd[p + "self_attn.W_pack.weight"], 3, axis=0)
        else:
            wq, wk, wv = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        wqkv = np.concatenate([wq.T.reshape(d, k, g, hd), wk.T.reshape(d, k, 1, hd), wv.T.reshape(d, k, 1, hd)], axis=2)
        layer = {
            "attention.wqkv": wqkv,
            "attention.wo": sd[p + "self_attn.o_proj.weight"].T.reshape(n, hd, d),
            "feed_forward.w1": sd[p + "mlp.gate_proj.weight"].T,
            "feed_forward.w3": sd[p + "mlp.up_proj.weight"].T,
            "feed_forward.w2": sd[p + "mlp.down_proj.weight"].T,
            "attention_norm.weight": sd[p + "input_layernorm.weight"],
            "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
        if m.qkv_bias:
            bq, bk, bv = (sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv")
            layer["attention.bqkv"] = np.concatenate(
                [bq.reshape(k, g, hd), bk.reshape(k, 1, hd), bv.reshape(k, 1, hd)], axis=1
            )
        if m.o_bias:
            layer["attention.bo"] = sd[p + "self_attn.o_proj.bias"]
        for name, a in layer.items():
            per_layer.setdefault(name, []).append(a)
    layers: dict = {}
    for name, arrays in per_layer.items():
        node = layers
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.stack(arrays)
    params = dict(
        tok_embeddings=sd["model.embed_tokens.weight"], layers=layers, norm=dict(weight=sd["model.norm.weight"])
    )
    if not m.tie_word_embeddings:
        params["output"] = sd["lm_head.weight"].T
    return params


def check_packed_logits(model, reference):
    """Our logits of the packed inputs equal ``reference(tokens [1, t]) -> [t, V]`` run on each document alone."""
    tokens, positions, segments = packed_inputs()
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
    close(logits[0], reference(tokens[:1]))
    close(logits[1, :10], reference(tokens[1:, :10]))
    close(logits[1, 10:], reference(tokens[1:, 10:]))
    return logits


def transformers_reference(hf):
    def run(tokens):
        with torch.no_grad():
            return hf(torch.from_numpy(tokens).long()).logits[0].numpy()

    return run


# --------------------------------------------------------------------------------------------------------------------
# QWEN2
# --------------------------------------------------------------------------------------------------------------------


def qwen2(tied, **kw):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **kw,
    )
    return nudge(transformers.Qwen2ForCausalLM(cfg))


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_matches_transformers(tiny_config, tied):
    hf = qwen2(tied)
    cfg = tiny_config("model_type='QWEN2'", "model.rope_base=1e6", "model.layer_norm_epsilon=1e-6",
                      f"model.tie_word_embeddings={tied}")  # fmt: skip
    assert cfg.model.qkv_bias and not cfg.model.o_bias and not cfg.model.qk_interleaved  # the family's defaults
    model = ours(cfg, hf_state_to_params(hf.state_dict(), cfg))
    assert hasattr(model.layers.attention, "bqkv") and not hasattr(model.layers.attention, "bo")
    assert hasattr(model, "output") != tied
    check_packed_logits(model, transformers_reference(hf))


def test_qwen2_sliding_window_is_accepted_only_where_it_changes_nothing(tiny_config):
    from internevo_jax.config import ConfigError

    window = ("model_type='QWEN2'", "model.use_sliding_window=True")
    assert tiny_config(*window, "model.sliding_window=32").model.sliding_window == 32  # = seq_len: no effect
    assert not tiny_config("model_type='QWEN2'", "model.sliding_window=16").model.use_sliding_window  # off: read only
    with pytest.raises(ConfigError, match=r"use_sliding_window=True with model.sliding_window=16 < data.seq_len=32"):
        tiny_config(*window, "model.sliding_window=16")


def test_internevo_v05_family_configs_load(tiny_config):
    """The model keys InternEvo v0.5's 7B_qwen2.py, 7B_gemma.py and 8B_internlm3.py write load and mean the same."""
    qwen2 = tiny_config("model_type='QWEN2'", "model.qkv_bias=True", "model.o_bias=False", "model.no_bias=False",
                        "model.use_sliding_window=False", "model.sliding_window=32768", "model.max_window_layers=28",
                        "model.qk_interleaved=False").model  # fmt: skip
    assert (qwen2.qkv_bias, qwen2.o_bias) == (True, False)
    gemma = tiny_config("model_type='GEMMA'", "model.add_unit_offset=True", "model.head_dim=32",
                        "model.use_swiglu=False", "model.no_bias=True").model  # fmt: skip
    assert gemma.hidden_act == "gelu_tanh" and gemma.add_unit_offset and gemma.head_dim == 32
    internlm3 = tiny_config("model_type='INTERNLM3'", "model.no_bias=True", "model.enable_qkv_fusion=False").model
    assert not internlm3.qkv_bias and not internlm3.o_bias
    from internevo_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.use_swiglu=False is not implemented"):  # GEMMA's GeGLU only
        tiny_config("model_type='QWEN2'", "model.use_swiglu=False")


# --------------------------------------------------------------------------------------------------------------------
# GEMMA
# --------------------------------------------------------------------------------------------------------------------


def gemma():
    # head_dim 32 with 4 heads: q is 128 wide on a 64 hidden, so the head dim is really independent (Gemma: 256)
    cfg = transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        hidden_activation="gelu_pytorch_tanh",
    )
    return nudge(transformers.GemmaForCausalLM(cfg))


def test_gemma_matches_transformers(tiny_config):
    hf = gemma()
    cfg = tiny_config("model_type='GEMMA'", "model.num_kv_attention_heads=1", "model.head_dim=32",
                      "model.layer_norm_epsilon=1e-6")  # fmt: skip
    m = cfg.model
    assert m.tie_word_embeddings and m.add_unit_offset and m.embed_scale and m.hidden_act == "gelu_tanh"
    model = ours(cfg, hf_state_to_params(hf.state_dict(), cfg))
    assert model.layers.attention.wqkv.shape == (2, HIDDEN, 1, 4 + 2, 32)
    logits = check_packed_logits(model, transformers_reference(hf))
    # Each Gemma piece matters: without it the logits differ by far more than the tolerance.
    tokens, positions, segments = (jnp.asarray(a) for a in packed_inputs())
    params = nnx.to_pure_dict(nnx.state(model))
    for key, value in (("add_unit_offset", False), ("embed_scale", False), ("hidden_act", "'silu'")):
        other = tiny_config("model_type='GEMMA'", "model.num_kv_attention_heads=1", "model.head_dim=32",
                            "model.layer_norm_epsilon=1e-6", f"model.{key}={value}")  # fmt: skip
        got = np.asarray(ours(other, params)(tokens, positions, segments))
        assert np.abs(got - logits).max() > 100 * 1e-4 * np.abs(logits).max(), key


def test_gemma_gelu_is_the_tanh_approximation():
    """GeGLU's GELU is torch's tanh approximation (HF gelu_pytorch_tanh), not the exact erf GELU: the two differ by
    ~1e-4 near |x| = 2, which a tiny model's logits cannot resolve at the parity tolerance: checked here."""
    from internevo_jax.model import _ACTIVATIONS

    x = np.linspace(-6, 6, 1201, dtype=np.float32)
    ours_ = np.asarray(_ACTIVATIONS["gelu_tanh"](jnp.asarray(x)))
    tanh = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours_, tanh, rtol=1e-6, atol=1e-6)
    assert np.abs(ours_ - exact).max() > 1e-4


def test_gemma_inits_its_norm_weights_at_zero(tiny_config):
    """Gemma's norm scales by (1 + w): a fresh model starts at w = 0, i.e. the identity scale, like HF's init."""
    cfg = tiny_config("model_type='GEMMA'")
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    assert float(jnp.abs(model.norm.weight[...]).max()) == 0.0
    assert not hasattr(model, "output")  # tied: the head is tok_embeddings^T


# --------------------------------------------------------------------------------------------------------------------
# INTERNLM3 and BAICHUAN2: a reference written from their published formulas
# --------------------------------------------------------------------------------------------------------------------


def reference_logits(sd, c, tokens):
    """The decoder of modeling_internlm3.py / modeling_baichuan.py (Baichuan2-7B) from its formulas, fp32 torch.

    Per layer, pre-norm: ``x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))`` then ``x += down(silu(gate(n2 x)) *
    up(n2 x))``; RMSNorm ``w * x / sqrt(mean(x^2) + eps)``; RoPE rotating channel i with i + H/2 (``rotate_half``),
    ``inv_freq = base^(-2i/H)``, and InternLM3's dynamic NTK: past ``max_position_embeddings`` the base becomes
    ``base * (f * t / max_pos - (f - 1))^(H / (H - 2))``; causal softmax attention scaled by ``H^-1/2`` with each kv
    head serving ``N / K`` consecutive query heads. Baichuan2 fuses q/k/v as ``W_pack`` (rows [q; k; v]) and its
    ``NormHead`` divides each vocab row of the head by its L2 norm.
    """
    x = sd["model.embed_tokens.weight"][torch.from_numpy(tokens[0]).long()]
    t, n, k, hd, eps = x.shape[0], c["heads"], c["kv_heads"], c["head_dim"], c["eps"]
    base = c["rope_theta"]
    if c.get("ntk_factor") and t > c["max_pos"]:
        f = c["ntk_factor"]
        base = base * ((f * t / c["max_pos"]) - (f - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rms(h, w):
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    def rope(h):
        h1, h2 = h[..., : hd // 2], h[..., hd // 2 :]
        return h * cos + torch.cat([-h2, h1], -1) * sin

    def linear(h, name):
        out = h @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        if p + "self_attn.W_pack.weight" in sd:
            q, kk, v = linear(h, p + "self_attn.W_pack").chunk(3, dim=-1)
        else:
            q, kk, v = (linear(h, p + f"self_attn.{s}_proj") for s in "qkv")
        q, kk, v = q.view(t, n, hd), kk.view(t, k, hd), v.view(t, k, hd)
        q, kk = rope(q), rope(kk)
        kk, v = kk.repeat_interleave(n // k, dim=1), v.repeat_interleave(n // k, dim=1)
        scores = torch.einsum("qnh,snh->nqs", q, kk) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + linear(torch.einsum("nqs,snh->qnh", probs, v).reshape(t, n * hd), p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(torch.nn.functional.silu(gate) * up, p + "mlp.down_proj")
    head = sd["lm_head.weight"]
    if c.get("norm_head"):
        head = torch.nn.functional.normalize(head, dim=-1)
    return (rms(x, sd["model.norm.weight"]) @ head.T).numpy()


def random_state(c, seed=0):
    """Random HF-named weights for ``reference_logits`` (InternLM3: q/k/v/o names; Baichuan2: ``W_pack``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=gen)

    n, k, hd, d = c["heads"], c["kv_heads"], c["head_dim"], HIDDEN
    sd = {
        "model.embed_tokens.weight": rand(VOCAB, d, scale=1.0),
        "model.norm.weight": rand(d, mean=1.0),
        "lm_head.weight": rand(VOCAB, d, scale=0.3),
    }
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        if c.get("w_pack"):
            sd[p + "self_attn.W_pack.weight"] = rand(3 * n * hd, d)
        else:
            sd |= {p + "self_attn.q_proj.weight": rand(n * hd, d), p + "self_attn.k_proj.weight": rand(k * hd, d),
                   p + "self_attn.v_proj.weight": rand(k * hd, d)}  # fmt: skip
        if c.get("qkv_bias"):
            sd |= {p + "self_attn.q_proj.bias": rand(n * hd), p + "self_attn.k_proj.bias": rand(k * hd),
                   p + "self_attn.v_proj.bias": rand(k * hd)}  # fmt: skip
        sd |= {
            p + "self_attn.o_proj.weight": rand(d, n * hd),
            p + "mlp.gate_proj.weight": rand(FFN, d),
            p + "mlp.up_proj.weight": rand(FFN, d),
            p + "mlp.down_proj.weight": rand(d, FFN),
            p + "input_layernorm.weight": rand(d, mean=1.0),
            p + "post_attention_layernorm.weight": rand(d, mean=1.0),
        }
    return sd


INTERNLM3 = dict(layers=2, heads=4, kv_heads=2, head_dim=32, eps=1e-5, rope_theta=5e7, qkv_bias=True,
                 ntk_factor=6.0, max_pos=16)  # fmt: skip
BAICHUAN2 = dict(layers=2, heads=4, kv_heads=4, head_dim=16, eps=1e-6, rope_theta=1e4, w_pack=True, norm_head=True)
INTERNLM3_CONFIG = ("model_type='INTERNLM3'", "model.head_dim=32", "model.qkv_bias=True", "model.rope_base=5e7",
                    "model.use_dynamic_ntk_rope=True", "model.rope_scaling_factor=6.0",
                    "model.max_position_embeddings=16")  # fmt: skip
BAICHUAN2_CONFIG = ("model_type='BAICHUAN2'", "model.num_kv_attention_heads=4", "model.layer_norm_epsilon=1e-6")


@pytest.mark.parametrize(
    "family, c, overrides", [("INTERNLM3", INTERNLM3, INTERNLM3_CONFIG), ("BAICHUAN2", BAICHUAN2, BAICHUAN2_CONFIG)]
)
def test_remote_code_families_match_their_published_formulas(tiny_config, family, c, overrides):
    cfg = tiny_config(*overrides)
    assert cfg.model.norm_head == (family == "BAICHUAN2")  # Baichuan2's NormHead is the family's default
    sd = random_state(c)
    model = ours(cfg, hf_state_to_params(sd, cfg))
    check_packed_logits(model, lambda tokens: reference_logits(sd, c, tokens))
    if family == "INTERNLM3":  # T = 24 > max_position_embeddings 16: the dynamic NTK base really is in play
        plain = dict(c, ntk_factor=None)
        tokens = packed_inputs()[0][:1]
        assert np.abs(reference_logits(sd, plain, tokens) - reference_logits(sd, c, tokens)).max() > 1e-2


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face folders: import (hf_folder.load_hf, what load_ckpt_info ckpt_type="hf" runs), export, round trips
# --------------------------------------------------------------------------------------------------------------------


def config_of(tiny_config, folder, *extra):
    """Our config for an HF folder: its ``model_type`` and ``model`` values from ``hf_config.model_overrides``."""
    model_type, values = hf_config.model_overrides(json.loads((folder / "config.json").read_text()))
    return tiny_config(f"model_type={model_type!r}", *(f"model.{k}={v!r}" for k, v in values.items()), *extra)


def tensors_of(folder):
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def assert_same_tensors(exported, original):
    assert sorted(exported) == sorted(original)
    for name, a in original.items():
        assert exported[name].dtype == a.dtype and np.array_equal(exported[name], a), name


@pytest.mark.parametrize("family", ["QWEN2 tied", "QWEN2", "GEMMA"])
def test_transformers_folders_import_export_bit_exact(tiny_config, tmp_path, family):
    hf = gemma() if family == "GEMMA" else qwen2(tied=family == "QWEN2 tied")
    hf.save_pretrained(tmp_path / "src")
    cfg = config_of(tiny_config, tmp_path / "src")
    assert cfg.model_type == family.split()[0]
    params = hf_folder.load_hf(tmp_path / "src", cfg.model)
    # the import equals the independent mapping of the model tests above, and computes transformers' logits
    jax.tree.map(np.testing.assert_array_equal, params, hf_state_to_params(hf.state_dict(), cfg))
    check_packed_logits(ours(cfg, params), transformers_reference(hf))

    out = hf_layout.save_hf(params, cfg.model, tmp_path / "out")
    assert_same_tensors(tensors_of(out), tensors_of(tmp_path / "src"))
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == [hf.__class__.__name__]
    assert hf_config.model_overrides(exported) == hf_config.model_overrides(
        json.loads((tmp_path / "src/config.json").read_text())
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    check_packed_logits(ours(cfg, params), transformers_reference(back))


def remote_code_folder(folder, sd, config):
    folder.mkdir()
    save_file({k: np.ascontiguousarray(v.numpy()) for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_json(c, **extra):
    """The published config.json keys of a remote-code family, for the tiny model ``c``."""
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=c["layers"],
                num_attention_heads=c["heads"], rms_norm_eps=c["eps"], hidden_act="silu", tie_word_embeddings=False,
                torch_dtype="float32", **extra)  # fmt: skip


INTERNLM3_JSON = hf_json(INTERNLM3, architectures=["InternLM3ForCausalLM"], model_type="internlm3",
                         num_key_value_heads=2, head_dim=32, qkv_bias=True, bias=False, rope_theta=5e7,
                         max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=6.0))  # fmt: skip
BAICHUAN2_JSON = hf_json(BAICHUAN2, architectures=["BaichuanForCausalLM"], model_type="baichuan",
                         max_position_embeddings=64, model_max_length=64)  # fmt: skip


@pytest.mark.parametrize(
    "family, c, config, layout",
    [("INTERNLM3", INTERNLM3, INTERNLM3_JSON, "internlm3"), ("BAICHUAN2", BAICHUAN2, BAICHUAN2_JSON, "baichuan2")],
)
def test_remote_code_folders_import_export_bit_exact(tiny_config, tmp_path, family, c, config, layout):
    sd = random_state(c)
    src = remote_code_folder(tmp_path / "src", sd, config)
    cfg = config_of(tiny_config, src)
    assert cfg.model_type == family
    params = hf_folder.load_hf(src, cfg.model)
    check_packed_logits(ours(cfg, params), lambda tokens: reference_logits(sd, c, tokens))
    out = hf_layout.save_hf(params, cfg.model, tmp_path / "out", layout=layout)
    assert_same_tensors(tensors_of(out), tensors_of(src))
    assert hf_config.model_overrides(json.loads((out / "config.json").read_text())) == hf_config.model_overrides(config)


def test_unsupported_architectures_are_refused_with_the_supported_list(tiny_config, tmp_path):
    supported = r"supported: \['LlamaForCausalLM', 'InternLMForCausalLM', 'InternLM2ForCausalLM', 'Qwen2ForCausalLM', "
    supported += r"'GemmaForCausalLM', 'InternLM3ForCausalLM', 'BaichuanForCausalLM', 'MixtralForCausalLM'\]"
    base = dict(INTERNLM3_JSON)
    with pytest.raises(ConfigError, match=r"'MistralForCausalLM' is not supported; " + supported):
        hf_config.model_overrides(base | dict(architectures=["MistralForCausalLM"]))
    with pytest.raises(ConfigError, match=r"'Gemma2ForCausalLM' is not supported: Gemma 2 soft-caps .*" + supported):
        hf_config.model_overrides(base | dict(architectures=["Gemma2ForCausalLM"]))
    with pytest.raises(ConfigError, match=r"Baichuan2-13B's, which uses ALiBi"):
        hf_config.model_overrides({k: v for k, v in BAICHUAN2_JSON.items() if k != "max_position_embeddings"})
    with pytest.raises(ConfigError, match=r"bias=True puts biases on o_proj and the MLP"):
        hf_config.model_overrides(INTERNLM3_JSON | dict(bias=True))
    # a Qwen2 sliding window shorter than the training length is refused by the config check
    _, values = hf_config.model_overrides(qwen2(True, use_sliding_window=True, sliding_window=16).config.to_dict()
                                        | dict(architectures=["Qwen2ForCausalLM"]))  # fmt: skip
    assert values["use_sliding_window"] and values["sliding_window"] == 16
    with pytest.raises(ConfigError, match=r"model.sliding_window=16 < data.seq_len=32"):
        tiny_config("model_type='QWEN2'", *(f"model.{k}={values[k]}" for k in ("use_sliding_window", "sliding_window")))


def test_a_run_starts_from_a_family_folder_and_the_converter_writes_it_back(tiny_config, tmp_path):
    """Baichuan2 end to end: ``load_ckpt_info`` ckpt_type='hf' starts a run from its folder, and
    ``tools/convert_checkpoint.py`` takes it HF -> ours -> HF (``--layout baichuan2``) bit-exact; a layout that cannot
    compute the model is refused before anything is read."""
    from internevo_jax import Trainer
    from tools import convert_checkpoint

    src = remote_code_folder(tmp_path / "src", random_state(BAICHUAN2), BAICHUAN2_JSON)
    model_type, values = hf_config.model_overrides(BAICHUAN2_JSON)
    flags = [f"model_type={model_type!r}", *(f"model.{k}={v!r}" for k, v in values.items())]
    info = f"ckpt.load_ckpt_info=dict(path='local:{src}', content=('model',), ckpt_type='hf')"
    cfg = tiny_config(*flags, info, f"run_folder='{tmp_path}/run'", "data.total_steps=1")
    state, _ = Trainer(cfg).initial_state()
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), hf_folder.load_hf(src, cfg.model)
    )

    tiny = ROOT / "configs" / "tiny.py"
    to_ours = ["--src", src, "--dst", tmp_path / "ours", f"--config={tiny}", *(f"--config.{f}" for f in flags)]
    assert convert_checkpoint.main([str(a) for a in to_ours]) == 0
    back = ["--src", f"local:{tmp_path}/ours", "--dst", tmp_path / "back", "--layout", "baichuan2"]
    assert convert_checkpoint.main([str(a) for a in back]) == 0
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(src))
    with pytest.raises(SystemExit) as e:  # argparse
        convert_checkpoint.main(["--src", f"local:{tmp_path}/ours", "--dst", str(tmp_path / "x"), "--layout", "qwen"])
    assert e.value.code == 2


def test_exports_a_class_cannot_compute_are_refused(tiny_config):
    """An export layout whose HF class would compute another function is refused, naming what does not fit."""
    cases = [
        (("model_type='GEMMA'",), "baichuan2", r"layout 'baichuan2' has no place for Gemma's"),
        (("model.o_bias=True",), "llama", r"an output bias without q/k/v biases has no Hugging Face layout"),
        (("model_type='BAICHUAN2'",), "baichuan2", r"Baichuan2-7B's layout is MHA"),  # the tiny config is GQA 4/2
        (("model_type='QWEN2'", "model.o_bias=True"), "internlm3", r"InternLM3's bias=True also adds MLP biases"),
        (("model_type='GEMMA'", "model.embed_scale=False"), "llama", r"only together \(GemmaForCausalLM\)"),
    ]
    for overrides, layout, message in cases:
        with pytest.raises(ValueError, match=message):
            hf_config.export_architecture(tiny_config(*overrides).model, layout)
    assert hf_config.export_architecture(tiny_config("model_type='QWEN2'").model) == "Qwen2ForCausalLM"
    assert hf_config.export_architecture(tiny_config("model_type='GEMMA'").model) == "GemmaForCausalLM"
    assert hf_config.export_architecture(tiny_config("model_type='INTERNLM3'").model) == "LlamaForCausalLM"
