"""Hugging Face interop: our logits equal transformers' on exported weights; import/export round trips (RoPE
scaling included); InternLM2 folders are read, not written; bad folders.

transformers + CPU torch are test-only dependencies (Python 3.11 CI); everything runs in fp32 on tiny models.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax.config import ConfigError
from internevo_jax.convert import hf_config, hf_folder, hf_layout
from internevo_jax.errors import CheckpointError, CheckpointMismatch
from internevo_jax.model import build_model

from . import conftest
from .conftest import random_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

T = 24


def ours(cfg, seed=3):
    """A tiny model of ``cfg`` with random (not zero) biases and norm weights, so every mapping is exercised."""
    model, params = random_tiny_model(cfg, seed)
    return model, jax.tree.map(np.asarray, params)


def hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize(
    "overrides",
    [
        ("model_type='LLAMA2'",),  # GQA 4 q on 2 kv heads, Meta-interleaved q/k layout (LLAMA2's default)
        ("model_type='INTERNLM'", "model.num_kv_attention_heads=4", "model.rope_base=500000"),  # MHA with biases
        ("model.qk_interleaved=True", "model.norm_head=True"),  # InternLM2 with adapt_hf=False and a normalised head
    ],
)
def test_exported_folder_matches_transformers(tiny_config, tmp_path, overrides):
    cfg = tiny_config(*overrides, "model.layer_norm_epsilon=1e-6")
    model, params = ours(cfg)
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf")  # AutoModel loads it without trust_remote_code
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, cfg.model.vocab_size)
    # Row 0: one sequence. Row 1: two packed samples [0, 10) and [10, 24) with positions restarting.
    cut = jnp.arange(T) < 10
    positions = jnp.stack([jnp.arange(T), jnp.where(cut, jnp.arange(T), jnp.arange(T) - 10)])
    segments = jnp.stack([jnp.ones(T, jnp.int32), jnp.where(cut, 1, 2)])
    logits = np.asarray(model(tokens, positions, segments))
    close(logits[0], hf_logits(folder, tokens[:1])[0])
    close(logits[1, :10], hf_logits(folder, tokens[1:, :10])[0])
    close(logits[1, 10:], hf_logits(folder, tokens[1:, 10:])[0])


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_dynamic_ntk_beyond_max_positions_matches_transformers(tiny_config, tmp_path, factor):
    cfg = tiny_config(
        "model_type='LLAMA2'",
        "model.use_dynamic_ntk_rope=True",
        "model.max_position_embeddings=16",
        f"model.rope_scaling_factor={factor}",
    )
    model, params = ours(cfg)
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["rope_scaling"]["factor"] == factor
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.model.vocab_size)
    logits = np.asarray(model(tokens, jnp.arange(T)[None], jnp.ones((1, T), jnp.int32)))
    close(logits, hf_logits(folder, tokens))
    # Past max_position_embeddings the base really changed: plain RoPE gives other logits.
    plain = tiny_config("model_type='LLAMA2'", "model.max_position_embeddings=16")
    plain_model = build_model(plain.model_type, plain.model, nnx.Rngs(0))
    nnx.update(plain_model, params)
    assert not np.allclose(np.asarray(plain_model(tokens, jnp.arange(T)[None], jnp.ones((1, T), jnp.int32))), logits)


def random_hf_llama(tmp_path, dtype, **kw):
    folder = tmp_path / "src"
    return conftest.random_hf_llama(folder, dtype, max_shard_size="40KB", **kw), folder  # several shards + index


def config_for(tiny_config, folder, *extra):
    model_type, values = hf_config.model_overrides(json.loads((folder / "config.json").read_text()))
    return tiny_config(f"model_type={model_type!r}", *(f"model.{k}={v!r}" for k, v in values.items()), *extra)


@pytest.mark.parametrize("extra", [(), ("model.qk_interleaved=False",)])
def test_import_llama_folder_matches_and_round_trips_bit_exact(tiny_config, tmp_path, extra):
    hf, src = random_hf_llama(tmp_path, torch.bfloat16, attention_bias=True)
    assert (src / "model.safetensors.index.json").exists()
    cfg = config_for(tiny_config, src, *extra)
    assert cfg.model.qk_interleaved == (not extra)  # LLAMA2 defaults to the Meta layout: q/k are permuted in
    params = hf_folder.load_hf(src, cfg.model)
    assert params["layers"]["attention"]["wqkv"].dtype == jnp.bfloat16

    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    tokens = jax.random.randint(jax.random.key(2), (1, T), 0, 256)
    logits = np.asarray(model(tokens, jnp.arange(T)[None], jnp.ones((1, T), jnp.int32)))
    with torch.no_grad():
        want = hf.float()(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()
    close(logits, want)

    out = hf_layout.save_hf(params, cfg.model, tmp_path / "out")
    original = {}
    for file in src.glob("*.safetensors"):
        original.update(load_file(file))
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, a in original.items():
        assert exported[name].dtype == a.dtype and np.array_equal(exported[name].view(np.uint16), a.view(np.uint16)), (
            name
        )


# Llama 3.1's scaling on the tiny model (head dim 16, base 10000): wavelengths 6.3 (< 32 / 4: kept), 19.9 (between:
# blended), 62.8 and up (> 32 / 1: divided by the factor), so every branch of the rule is taken.
ROPE_SCALINGS = {
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    ),
    "linear": dict(type="linear", factor=4.0),  # the older key name
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers_and_round_trips(tiny_config, tmp_path, kind):
    hf, src = random_hf_llama(tmp_path, None, rope_scaling=dict(ROPE_SCALINGS[kind]))
    cfg = config_for(tiny_config, src)
    assert cfg.model.rope_scaling_type == kind and not cfg.model.use_dynamic_ntk_rope
    params = hf_folder.load_hf(src, cfg.model)
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    t = 64  # max_position_embeddings: positions far past the original 32
    tokens = jax.random.randint(jax.random.key(3), (1, t), 0, 256)
    positions, segments = jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)
    logits = np.asarray(model(tokens, positions, segments))
    with torch.no_grad():
        want = hf(torch.tensor(np.asarray(tokens)).long()).logits.numpy()
    close(logits, want)
    # The scaling is really applied: plain RoPE (what the import did before) computes another function.
    plain = tiny_config(f"model_type={cfg.model_type!r}", *(f"model.{k}={cfg.model[k]!r}" for k in MODEL_KEYS))
    assert plain.model.rope_scaling_type is None
    plain_model = build_model(plain.model_type, plain.model, nnx.Rngs(0))
    nnx.update(plain_model, jax.tree.map(jnp.asarray, params))
    assert np.abs(np.asarray(plain_model(tokens, positions, segments)) - want).max() > 100 * 1e-4 * np.abs(want).max()

    # Export: config.json's rope_scaling reads back to the same model section, and transformers computes our logits.
    out = hf_layout.save_hf(params, cfg.model, tmp_path / "out")
    exported = json.loads((out / "config.json").read_text())
    assert exported["rope_scaling"]["rope_type"] == kind
    assert hf_config.model_overrides(exported) == hf_config.model_overrides(
        json.loads((src / "config.json").read_text())
    )
    close(logits, hf_logits(out, tokens))
    # A config without the scaling is told so by name before anything is read.
    with pytest.raises(ConfigError, match=rf"model.rope_scaling_type=None but .*config.json has '{kind}'"):
        hf_folder.load_hf(src, plain.model)


MODEL_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads", "mlp_ratio")
MODEL_KEYS += ("multiple_of", "layer_norm_epsilon", "rope_base", "max_position_embeddings", "no_bias")


def internlm2_folder(params, cfg, folder):
    """An ``InternLM2ForCausalLM`` folder as InternLM's own export writes it (fused ``wqkv`` rows per kv head
    ``[q_0..q_{G-1}, k, v]``, ``feed_forward.w1/w3/w2`` = gate/up/down), built here from our params without
    ``convert``'s tables, which write the Llama layout only."""
    m = cfg.model
    d, n, layers = m.hidden_size, m.num_attention_heads, params["layers"]
    attn, ffn = layers["attention"], layers["feed_forward"]
    tensors = {
        "model.tok_embeddings.weight": params["tok_embeddings"],
        "model.norm.weight": params["norm"]["weight"],
        "output.weight": params["output"].T,
    }
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "attention.wqkv.weight": attn["wqkv"][i].reshape(d, -1).T,
            p + "attention.wo.weight": attn["wo"][i].reshape(n * (d // n), d).T,
            p + "feed_forward.w1.weight": ffn["w1"][i].T,
            p + "feed_forward.w3.weight": ffn["w3"][i].T,
            p + "feed_forward.w2.weight": ffn["w2"][i].T,
            p + "attention_norm.weight": layers["attention_norm"]["weight"][i],
            p + "ffn_norm.weight": layers["ffn_norm"]["weight"][i],
        }
        if not m.no_bias:
            tensors |= {p + "attention.wqkv.bias": attn["bqkv"][i].reshape(-1), p + "attention.wo.bias": attn["bo"][i]}
    folder.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = hf_config.hf_config(m) | dict(
        architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=not m.no_bias
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_internlm2_folders_are_read_with_the_w2_w3_hazard_but_not_written(tiny_config, tmp_path):
    cfg = tiny_config("model.no_bias=False")
    _, params = ours(cfg)
    folder = internlm2_folder(params, cfg, tmp_path / "internlm2")
    back = hf_folder.load_hf(folder, cfg.model)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    # Legacy InternLM naming (w2 = up, w3 = down): the down projection is found by its shape.
    tensors = load_file(folder / "model.safetensors")
    for i in range(cfg.model.num_layers):
        p = f"model.layers.{i}.feed_forward."
        tensors[p + "w2.weight"], tensors[p + "w3.weight"] = tensors[p + "w3.weight"], tensors[p + "w2.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, hf_folder.load_hf(folder, cfg.model), params)

    # No InternLM2 export: transformers could not load it without InternLM's remote code. The reason, and the way out.
    with pytest.raises(ValueError, match=r"transformers has no InternLM2 architecture.*--layout llama"):
        hf_layout.save_hf(params, cfg.model, tmp_path / "il2", layout="internlm2")
    assert not (tmp_path / "il2").exists()


def test_bad_folders_name_the_problem(tiny_config, tmp_path):
    cfg = tiny_config("model_type='LLAMA2'")
    _, params = ours(cfg)
    folder = hf_layout.save_hf(params, cfg.model, tmp_path / "hf")

    with pytest.raises(
        ConfigError, match=r"model.hidden_size=128 but .*config.json has 64\n.*override: --config.model.hidden_size=64$"
    ):
        hf_folder.load_hf(folder, tiny_config("model_type='LLAMA2'", "model.hidden_size=128").model)
    with pytest.raises(ConfigError, match=r"model.no_bias=False"):
        hf_folder.load_hf(folder, tiny_config("model_type='LLAMA2'", "model.no_bias=False").model)

    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    good = tensors[name]
    tensors[name] = good[:16]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointMismatch, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\).*\(32, 64\)"
    ):
        hf_folder.load_hf(folder, cfg.model)
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight' is missing"):
        hf_folder.load_hf(folder, cfg.model)
    tensors[name] = good
    tensors["model.layers.2.mlp.gate_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"no place for: \['model.layers.2.mlp.gate_proj.weight'\]"):
        hf_folder.load_hf(folder, cfg.model)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ConfigError, match=r"'GPT2LMHeadModel' is not supported; supported: \['LlamaForCausalLM'"):
        hf_folder.load_hf(folder, cfg.model)
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_folder.load_hf(tmp_path, cfg.model)
    with pytest.raises(FileExistsError, match="not empty"):
        hf_layout.save_hf(params, cfg.model, folder)
