"""Model shapes, causal + segment masking, logical axis names, remat/scan invariance."""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.model import build_model

from .conftest import ROOT


def make(tiny_config, *overrides):
    cfg = tiny_config(*overrides)
    return cfg, build_model(cfg.model_type, cfg.model, nnx.Rngs(0))


def inputs(b=2, t=32, vocab=256, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    positions = jnp.tile(jnp.arange(t), (b, 1))
    return tokens, positions, jnp.ones((b, t), jnp.int32)


def test_shapes_and_param_count(tiny_config):
    cfg, model = make(tiny_config)
    tokens, positions, segments = inputs()
    logits = model(tokens, positions, segments)
    assert logits.shape == (2, 32, 256) and logits.dtype == jnp.float32
    params = nnx.to_pure_dict(nnx.state(model))
    d, f, v, layers = 64, 256, 256, 2  # ffn: 256 * ceil(int(64 * 2) / 256)
    per_layer = d * (4 + 2 * 2) * 16 + 4 * 16 * d + 3 * d * f + 2 * d
    expected = layers * per_layer + 2 * v * d + d
    assert sum(x.size for x in jax.tree.leaves(params)) == expected
    assert params["layers"]["attention"]["wqkv"].shape == (2, 64, 2, 4, 16)  # [L, D, K, G + 2, H]
    assert params["layers"]["feed_forward"]["w2"].shape == (2, 256, 64)  # down projection [F, D]


def test_causal(tiny_config):
    _, model = make(tiny_config)
    tokens, positions, segments = inputs()
    base = model(tokens, positions, segments)
    changed = model(tokens.at[:, 20].set((tokens[:, 20] + 1) % 256), positions, segments)
    np.testing.assert_array_equal(base[:, :20], changed[:, :20])
    assert not np.allclose(base[:, 20:], changed[:, 20:])


def test_segments_do_not_see_each_other(tiny_config):
    _, model = make(tiny_config)
    tokens, _, _ = inputs()
    # Two packed samples per row: [0, 12) and [12, 32), positions restarting at 0.
    segments = jnp.where(jnp.arange(32) < 12, 1, 2)[None].repeat(2, 0)
    positions = jnp.where(jnp.arange(32) < 12, jnp.arange(32), jnp.arange(32) - 12)[None].repeat(2, 0)
    base = model(tokens, positions, segments)
    changed = model(tokens.at[:, 3].set((tokens[:, 3] + 7) % 256), positions, segments)
    np.testing.assert_allclose(base[:, 12:], changed[:, 12:], rtol=0, atol=0)
    # The second segment alone, unpacked, gives the same logits (attention and RoPE restart per segment).
    alone = model(tokens[:, 12:], positions[:, 12:], jnp.ones((2, 20), jnp.int32))
    np.testing.assert_allclose(base[:, 12:], alone, rtol=1e-5, atol=1e-5)


@nnx.jit  # eager op-by-op dispatch through scan + remat is slower than one compile (cached for the reference model)
def _loss_and_grad(model, tokens, positions, segments):
    return nnx.value_and_grad(lambda m: m(tokens, positions, segments).mean())(model)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.checkpoint=0.5",),
        ("model.scan_layers=False",),
        ("model.remat_policy=save_dots", "model.checkpoint=True"),
    ],
)
def test_remat_and_unrolled_layers_compute_the_same(tiny_config, overrides):
    _, ref = make(tiny_config)
    _, other = make(tiny_config, *overrides)
    tokens, positions, segments = inputs()

    (l_ref, g_ref) = _loss_and_grad(ref, tokens, positions, segments)
    (l_other, g_other) = _loss_and_grad(other, tokens, positions, segments)
    np.testing.assert_allclose(l_ref, l_other, rtol=1e-6)
    g_ref, g_other = nnx.to_pure_dict(g_ref), nnx.to_pure_dict(g_other)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_ref, g_other)


def test_every_param_has_logical_axes(tiny_config):
    cfg = tiny_config("model.no_bias=False", "model.norm_type=layernorm")
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)


def test_scaled_init_shrinks_deeper_output_projections(tiny_config):
    _, model = make(tiny_config, "model.num_layers=4")
    wo = nnx.to_pure_dict(nnx.state(model))["layers"]["attention"]["wo"]
    stds = np.asarray(wo).reshape(4, -1).std(axis=1)
    np.testing.assert_allclose(stds, 0.02 / np.sqrt(2 * np.arange(1, 5)), rtol=0.1)


# What placing arrays on devices is spelled with: none of it belongs in model code, however it is reached
# (``import jax`` then ``jax.sharding.NamedSharding(...)``, ``from jax.sharding import Mesh``, ``jax.make_mesh``).
MESH_NAMES = {
    "sharding",
    "Mesh",
    "AbstractMesh",
    "NamedSharding",
    "PositionalSharding",
    "SingleDeviceSharding",
    "PartitionSpec",
    "make_mesh",
    "get_abstract_mesh",
    "set_mesh",
    "use_mesh",
    "shard_map",
    "with_sharding_constraint",
    "device_put",
    "devices",
    "local_devices",
}


def mesh_uses(source: str) -> list[str]:
    """Where ``source`` names a mesh, a sharding or devices: imports, attributes, names and ``mesh`` parameters."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            if module == "internevo_jax.mesh":  # the one bridge: constrain(x, names), a no-op without a mesh
                found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name != "constrain"]
                continue
            words = {w for name in [module] + [a.name for a in node.names] for w in name.split(".")}
            found += [f"line {node.lineno}: imports {w}" for w in sorted(words & (MESH_NAMES | {"mesh"}))]
        elif isinstance(node, ast.Attribute) and node.attr in MESH_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in MESH_NAMES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.arg) and "mesh" in node.arg.lower():
            found.append(f"line {node.lineno}: parameter {node.arg}")
    return found


def test_model_code_has_no_mesh():
    """Design rule: model code carries logical names only (DESIGN.md, principle 1)."""
    assert mesh_uses((ROOT / "internevo_jax" / "model.py").read_text()) == []


@pytest.mark.parametrize(
    "line",
    [
        "import jax\nx = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())",
        "from jax.sharding import Mesh",
        "import jax.sharding as shd",
        "import jax\nm = jax.make_mesh((8,), ('data',))",
        "import jax\ny = jax.device_put(x, s)",
        "def f(x, mesh):\n    return x",
        "from internevo_jax.mesh import make_mesh",
    ],
)
def test_the_mesh_check_sees_each_spelling(line):
    assert mesh_uses(line), line
    assert mesh_uses("from internevo_jax.mesh import constrain\nimport jax.numpy as jnp") == []


def test_preset_shapes_need_no_memory():
    cfg = config_lib.load(ROOT / "configs" / "7b_sft.py")
    abstract = nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    # InternLM-7B: 32 x (4 * 4096^2 qkv+o, 3 * 4096 * 11008 mlp, biases, norms) + 2 x 103168 x 4096 + final norm.
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 3 * 4096 + 4096 + 2 * 4096
    assert n == 32 * per_layer + 2 * 103168 * 4096 + 4096


def test_dropout_is_keyed_and_off_in_evaluation(tiny_config):
    _, plain = make(tiny_config)
    _, drop = make(tiny_config, "model.drop_rate=0.3", "model.attn_drop_rate=0.3")
    tokens, positions, segments = inputs()
    run = lambda m, key=None: m(tokens, positions, segments, key)  # noqa: E731
    base = run(plain)
    np.testing.assert_array_equal(run(drop), base)  # no key: evaluation, dropout off
    np.testing.assert_array_equal(run(plain, jax.random.key(1)), base)  # rate 0: no-op
    a = run(drop, jax.random.key(1))
    np.testing.assert_array_equal(run(drop, jax.random.key(1)), a)  # same key, same masks
    assert not np.allclose(a, base) and not np.allclose(run(drop, jax.random.key(2)), a)
    # Attention dropout alone also changes the function (the probabilities are dropped, not only the stream).
    _, attn_only = make(tiny_config, "model.attn_drop_rate=0.3")
    assert not np.allclose(run(attn_only, jax.random.key(1)), base)


def test_interleaved_rope_is_the_half_split_rope_of_reordered_channels(tiny_config):
    """adapt_hf=False (Meta layout) = InternEvo's [even..., odd...] channel reorder before half-split RoPE."""
    _, half = make(tiny_config, "model.qk_interleaved=False")
    _, inter = make(tiny_config, "model.qk_interleaved=True")
    params = nnx.to_pure_dict(nnx.state(half))
    wqkv = np.asarray(params["layers"]["attention"]["wqkv"])  # [L, D, K, G + 2, H]
    h = wqkv.shape[-1]
    to_inter = np.stack([np.arange(h // 2), np.arange(h // 2, h)], axis=-1).reshape(h)  # new[2i]=old[i], new[2i+1]=...
    moved = wqkv.copy()
    moved[..., :-1, :] = wqkv[..., :-1, to_inter]  # q and k slots; v keeps its channels
    nnx.update(
        inter,
        dict(
            params,
            layers=dict(
                params["layers"], attention=dict(wqkv=jnp.asarray(moved), wo=params["layers"]["attention"]["wo"])
            ),
        ),
    )
    tokens, positions, segments = inputs()
    np.testing.assert_allclose(
        inter(tokens, positions, segments), half(tokens, positions, segments), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(
        make(tiny_config, "model.qk_interleaved=True")[1](tokens, positions, segments),
        half(tokens, positions, segments),
    )


def test_norm_head_normalises_vocab_rows(tiny_config):
    _, model = make(tiny_config, "model.norm_head=True")
    params = nnx.to_pure_dict(nnx.state(model))
    tokens, positions, segments = inputs()
    base = model(tokens, positions, segments)
    params["output"] = params["output"] * jnp.arange(1, 257, dtype=jnp.float32)  # rescale each vocab column
    nnx.update(model, params)
    np.testing.assert_allclose(model(tokens, positions, segments), base, rtol=1e-5, atol=1e-6)


def test_fp32_norm_keeps_the_norm_weight_unrounded(tiny_config):
    tokens, positions, segments = inputs()
    outs = []
    for flag in (False, True):
        _, model = make(tiny_config, "model.dtype='torch.bfloat16'", f"use_fp32_norm={flag}")
        params = nnx.to_pure_dict(nnx.state(model))
        params["norm"]["weight"] = params["norm"]["weight"] + 1e-3  # 1.001 is not a bf16 number
        nnx.update(model, params)
        outs.append(model(tokens, positions, segments))
    assert not np.array_equal(outs[0], outs[1])


def test_cudnn_segment_layout_matches_the_runs():
    from internevo_jax.ops.attention import segment_layout

    segments = np.array([[1, 1, 1, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 4, 4, 0, 0]])
    seqlens, offsets = (np.asarray(a) for a in segment_layout(jnp.asarray(segments), 5))
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1, -1], [0, -1, -1, -1, -1, -1], [0, 1, 2, 3, 6, -1]])
    np.testing.assert_array_equal(seqlens, [[3, 2, 3, -1, -1], [8, -1, -1, -1, -1], [1, 1, 1, 3, 2]])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla_on_packed_rows():
    from internevo_jax.ops.attention import cudnn_attention, xla_attention

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 256, 2, 4, 64), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, 256, 2, 64), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, 256, 2, 64), jnp.bfloat16)
    t = jnp.arange(256)
    segments = jnp.stack([jnp.ones(256, jnp.int32), 1 + (t >= 100) + (t >= 180)])
    want = xla_attention(q, k, v, segments).astype(jnp.float32)
    got = cudnn_attention(q, k, v, segments, max_segments=8).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
