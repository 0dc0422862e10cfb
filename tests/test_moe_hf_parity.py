"""MIXTRALMOE computes Hugging Face's ``MixtralForCausalLM`` (a tiny random one, fp32): the logits agree when our
router keeps every token (``drop_tokens=False`` or the dropless path), in evaluation (no routing noise).

The weights are mapped by hand here (HF's fused ``experts.gate_up_proj`` [E, 2F, D] = gate rows then up rows,
``down_proj`` [E, D, F], router ``gate.weight`` [E, D]); the checkpoint converter does not read Mixtral folders yet.
"""

import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.model import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, F, E, L, N, K, V = 64, 128, 4, 2, 4, 2, 96


def hf_model():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        num_local_experts=E,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF initialises norms to 1 and some weights to 0: randomise all
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def ours(moe_type):
    cfg = config_lib.build(
        dict(
            model_type="MIXTRALMOE",
            model=dict(
                num_experts=E,
                moe_type=moe_type,
                vocab_size=V,
                hidden_size=D,
                num_layers=L,
                num_attention_heads=N,
                num_kv_attention_heads=K,
                mlp_ratio=2,
                multiple_of=F,
                dtype="torch.float32",
                attn_impl="xla",
            ),
            moe=dict(top_k=2, drop_tokens=False),
            data=dict(seq_len=16, micro_bsz=1, type="dummy"),
            ckpt=dict(enable_save_ckpt=False),
        )
    )
    return build_model(cfg.model_type, cfg.model, nnx.Rngs(0))


def load_hf_weights(model, hf):
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    g, h = N // K, D // N

    def layer(i):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].T.reshape(D, K, g, h)
        k = sd[p + "self_attn.k_proj.weight"].T.reshape(D, K, 1, h)
        v = sd[p + "self_attn.v_proj.weight"].T.reshape(D, K, 1, h)
        gate_up = sd[p + "mlp.experts.gate_up_proj"]
        return dict(
            attention=dict(
                wqkv=np.concatenate([q, k, v], axis=2), wo=sd[p + "self_attn.o_proj.weight"].T.reshape(N, h, D)
            ),
            attention_norm=dict(weight=sd[p + "input_layernorm.weight"]),
            ffn_norm=dict(weight=sd[p + "post_attention_layernorm.weight"]),
            feed_forward=dict(
                wg=sd[p + "mlp.gate.weight"].T,
                w1=gate_up[:, :F].transpose(0, 2, 1),
                w3=gate_up[:, F:].transpose(0, 2, 1),
                w2=sd[p + "mlp.experts.down_proj"].transpose(0, 2, 1),
            ),
        )

    layers = [layer(i) for i in range(L)]
    import jax

    pure = dict(
        tok_embeddings=sd["model.embed_tokens.weight"],
        layers=jax.tree.map(lambda *xs: np.stack(xs), *layers),
        norm=dict(weight=sd["model.norm.weight"]),
        output=sd["lm_head.weight"].T,
    )
    state = nnx.state(model)
    assert jax.tree.structure(nnx.to_pure_dict(state)) == jax.tree.structure(pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


@pytest.mark.parametrize("moe_type", ["GShard", "MegaBlock-D"])
def test_mixtral_logits_equal_transformers(moe_type):
    hf = hf_model()
    model = ours(moe_type)
    load_hf_weights(model, hf)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    positions = np.tile(np.arange(24), (2, 1))
    got = np.asarray(model(tokens, positions, np.ones_like(tokens)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
