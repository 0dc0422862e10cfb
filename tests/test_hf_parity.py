"""Logits equal transformers' LlamaForCausalLM on the same weights (fp32, CPU torch; test-only dependency)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax.convert import hf_llama_config, to_hf_llama
from internevo_jax.model import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_model(cfg, params):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_llama_config(cfg.model).items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {k: torch.from_numpy(np.array(v).copy()) for k, v in to_hf_llama(params, cfg.model).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        ("model_type='LLAMA2'",),  # GQA: 4 q heads on 2 kv heads
        ("model_type='INTERNLM'", "model.num_kv_attention_heads=4", "model.rope_base=500000"),  # MHA with biases
    ],
)
def test_logits_match_transformers(tiny_config, overrides):
    cfg = tiny_config(*overrides, "model.layer_norm_epsilon=1e-6")
    ours = build_model(cfg.model_type, cfg.model, nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(ours))
    if not cfg.model.no_bias:  # zero-initialised biases would not test the bias mapping
        keys = jax.random.split(jax.random.key(7), 2)
        bqkv = params["layers"]["attention"]["bqkv"]
        params["layers"]["attention"]["bqkv"] = 0.1 * jax.random.normal(keys[0], bqkv.shape)
        params["layers"]["attention"]["bo"] = 0.1 * jax.random.normal(
            keys[1], params["layers"]["attention"]["bo"].shape
        )
        nnx.update(ours, params)
    hf = hf_model(cfg, params)

    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.model.vocab_size)
    # Row 0: one sequence. Row 1: two packed samples [0, 10) and [10, 24) with positions restarting.
    positions = jnp.stack([jnp.arange(24), jnp.where(jnp.arange(24) < 10, jnp.arange(24), jnp.arange(24) - 10)])
    segments = jnp.stack([jnp.ones(24, jnp.int32), jnp.where(jnp.arange(24) < 10, 1, 2)])
    logits = np.asarray(ours(tokens, positions, segments))

    with torch.no_grad():
        t = torch.from_numpy(np.array(tokens)).long()
        full = hf(t[:1]).logits.numpy()
        first = hf(t[1:, :10]).logits.numpy()
        second = hf(t[1:, 10:]).logits.numpy()
    scale = np.abs(full).max()
    np.testing.assert_allclose(logits[0], full[0], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(logits[1, :10], first[0], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(logits[1, 10:], second[0], rtol=1e-4, atol=1e-4 * scale)
