"""MIXTRALMOE computes Hugging Face's ``MixtralForCausalLM`` (a tiny random one, fp32): the logits agree when our
router keeps every token (``drop_tokens=False`` or the dropless path), in evaluation (no routing noise).

The first test maps the in-memory weights by hand (transformers 5's fused ``experts.gate_up_proj`` [E, 2F, D] =
gate rows then up rows, ``down_proj`` [E, D, F], router ``gate.weight`` [E, D]), independently of the converter; the
others go through the converter and the files transformers reads and writes (one tensor per expert,
``block_sparse_moe.experts.{e}.w1/w2/w3``).
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
    cfg = model_config(moe_type, full=True)
    return build_model(cfg.model_type, cfg.model, nnx.Rngs(0))


def model_config(moe_type="GShard", full=False):
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
    return cfg if full else cfg.model


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


def to_pure(model):
    import jax

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def logits_of(model, tokens):
    positions = np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))
    return np.asarray(model(tokens, positions, np.ones_like(tokens)))


def test_mixtral_export_loads_in_transformers_with_our_logits_and_imports_back_bit_exact(tmp_path):
    from internevo_jax.convert import hf_folder, hf_layout

    model = ours("GShard")
    load_hf_weights(model, hf_model())  # random weights in every tensor
    params = to_pure(model)
    cfg_model = model_config()
    folder = hf_layout.save_hf(params, cfg_model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_experts_per_tok == 2
    tokens = np.random.default_rng(1).integers(0, V, size=(2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits_of(model, tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    back = hf_folder.load_hf(folder, cfg_model)
    import jax

    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # round trip bit-exact
    assert jax.tree.structure(back) == jax.tree.structure(params)


def test_transformers_mixtral_folder_imports_with_its_function(tmp_path):
    """A folder saved by transformers -> load_hf -> our logits; the config taken from config.json (generate's path)
    is MIXTRALMOE with the folder's top-k and no capacity."""
    from internevo_jax.convert import hf_folder
    from internevo_jax.generate import checkpoint_config

    hf = hf_model()
    hf.save_pretrained(tmp_path / "src")
    cfg = checkpoint_config(str(tmp_path / "src"), ["--config.model.attn_impl='xla'"])
    assert cfg.model_type == "MIXTRALMOE" and cfg.model.num_experts == E
    assert cfg.moe.top_k == 2 and cfg.moe.drop_tokens is False
    params = hf_folder.load_hf(tmp_path / "src", cfg.model)
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    tokens = np.random.default_rng(2).integers(0, V, size=(2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits_of(model, tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_greedy_generation_equals_transformers_generate_on_a_mixtral_folder(tmp_path):
    """tools/generate.py's path without --config (checkpoint_config + load_model + Generator) on a folder saved by
    transformers: the greedy tokens equal ``generate``'s, prompts of two lengths in one batch."""
    from internevo_jax.generate import Generator, checkpoint_config, load_model

    hf = hf_model()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # logits far apart: greedy paths do not hinge on rounding
    hf.save_pretrained(tmp_path / "src")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16]]
    want = []
    for p in prompts:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), max_length=20, do_sample=False, eos_token_id=[2], pad_token_id=0)
        want.append(ids[0, len(p) :].tolist())
    settings = dict(do_sample=False, max_length=20, batch_size=2, eos_id=[2])
    cfg = checkpoint_config(str(tmp_path / "src"), [f"--config.generation.{k}={v!r}" for k, v in settings.items()])
    outputs = Generator(load_model(cfg), cfg.generation).generate(prompts)
    assert [o.tokens for o in outputs] == want
