"""Pipeline parallelism (fp32, tiny model, 8 fake CPU devices): the pipelined layer stack equals the plain scan, and
a train step on a (pipeline 2 x data 4) mesh equals the same step without pipeline on the same global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import mesh as mesh_lib
from internevo_jax import pipeline
from internevo_jax.config import ConfigError, check_pipeline
from internevo_jax.model import build_model
from internevo_jax.optim import init_loss_scale, make_optimizer
from internevo_jax.step import TrainState, abstract_model, make_eval_step, make_train_step, state_shardings

M, ROWS, T = 4, 8, 32  # micro-batches, global rows (divisible by every data-parallel size here), packed length


def make_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``[M, ROWS, T]`` packed rows of two documents each (restarting positions, no label across the boundary)."""
    rng = np.random.default_rng(seed)
    shape = (M, ROWS, T)
    tokens = rng.integers(1, vocab, shape).astype(np.int32)
    cut = T // 2 + 3
    ones = np.ones(shape, np.int32)
    labels = np.concatenate([tokens[..., 1:], np.full(shape[:2] + (1,), -100, np.int32)], axis=-1)
    labels[..., cut - 1] = -100
    return dict(
        tokens=tokens,
        labels=labels,
        positions=np.where(np.arange(T) < cut, np.arange(T), np.arange(T) - cut).astype(np.int32) * ones,
        segment_ids=np.where(np.arange(T) < cut, 1, 2).astype(np.int32) * ones,
        type_ids=0 * ones,
    )


def test_layer_placement_is_internevos():
    """Chunk c of stage p holds InternEvo's ``partition_uniform(L, P, V)[p][c]`` layer range."""

    def partition_uniform(num_items, pipeline_parallel_size, num_chunks):  # InternEvo, for divisible sizes
        parts = [[] for _ in range(pipeline_parallel_size)]
        partition_items = num_items // num_chunks
        for idx in range(num_chunks):
            base_idx = idx * partition_items
            chunk_size = partition_items // pipeline_parallel_size
            for p in range(pipeline_parallel_size):
                parts[p].append((base_idx, base_idx + chunk_size))
                base_idx += chunk_size
        return parts

    for layers, p, v in ((8, 2, 2), (12, 2, 3), (8, 4, 1), (16, 4, 2)):
        placement = np.asarray(pipeline.layer_placement(layers, p, v))
        for stage, ranges in enumerate(partition_uniform(layers, p, v)):
            for chunk, (lo, hi) in enumerate(ranges):
                assert list(placement[chunk, stage]) == list(range(lo, hi))


_REFERENCE = {}


@pytest.mark.parametrize("stages,chunks", [(2, 1), (4, 1), (2, 2)])
def test_pipelined_stack_equals_scan(tiny_config, stages, chunks):
    """Hidden states and gradients of all params equal ``features`` run micro-batch by micro-batch (dropout on, so
    the per-layer keys must reach the right layer of the right micro-batch). P=4 runs on a (pipeline 4 x data 2)
    mesh, the others without one: the schedule's arithmetic is the same."""
    cfg = tiny_config("model.num_layers=4", "model.drop_rate=0.1", f"parallel.pipeline.size={stages}")
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    b = {k: jnp.asarray(v[:, :2]) for k, v in make_batch(cfg.model.vocab_size).items()}  # 2 rows per micro-batch
    keys = jax.random.split(jax.random.key(7), M)
    cotangent = jax.random.normal(jax.random.key(3), (M, 2, T, cfg.model.hidden_size))

    def plain(params):
        mdl = nnx.merge(graphdef, params)
        out = jax.lax.map(lambda a: mdl.features(*a), (b["tokens"], b["positions"], b["segment_ids"], keys))
        return jnp.sum(out * cotangent), out

    def piped(params):
        mdl = nnx.merge(graphdef, params)
        out = pipeline.features(mdl, b["tokens"], b["positions"], b["segment_ids"], keys, stages, chunks)
        return jnp.sum(out * cotangent), out

    if "plain" not in _REFERENCE:  # the same model, data and keys for every case
        _REFERENCE["plain"] = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    (_, want), want_grads = _REFERENCE["plain"]
    fn = jax.jit(jax.value_and_grad(piped, has_aux=True))
    if stages == 4:
        mesh = mesh_lib.make_mesh(cfg.parallel)
        assert dict(mesh.shape)["pipeline"] == 4
        with mesh_lib.activate(mesh, mesh_lib.rules(cfg.parallel)):
            (_, got), grads = fn(params)
    else:
        (_, got), grads = fn(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=str(path))


def build(cfg):
    """A train step and eval step jitted on the mesh ``cfg.parallel`` asks for, as the Trainer builds them."""
    mesh = mesh_lib.make_mesh(cfg.parallel, jax.devices())
    rules = mesh_lib.rules(cfg.parallel)
    graphdef, abstract_params = abstract_model(cfg)
    tx = make_optimizer(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler)

    def init(key):
        model = build_model(cfg.model_type, cfg.model, nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.state(model))
        return TrainState(params, tx.init(params), init_loss_scale(cfg.grad_scaler, "float32"), jnp.int32(0))

    key = jax.random.key(cfg.seed)
    shardings = state_shardings(jax.eval_shape(init, key), mesh_lib.param_shardings(abstract_params, mesh, rules))
    batch_sharding, replicated = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    step = jax.jit(
        make_train_step(cfg, graphdef, tx, 1),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
    )
    evaluate = jax.jit(
        make_eval_step(cfg, graphdef, 1), in_shardings=(shardings.params, batch_sharding), out_shardings=replicated
    )

    def batch(seed):
        return {k: jax.device_put(v, batch_sharding) for k, v in make_batch(cfg.model.vocab_size, seed).items()}

    with mesh_lib.activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(key)
        compiled = step.lower(state, batch(0)).compile()
        eval_out = evaluate(state.params, batch(9))
        metrics = []
        for i in range(3):
            state, m = compiled(state, batch(i))
            metrics.append(m)
    return compiled, state, jax.device_get(metrics), jax.device_get(eval_out)


def test_train_step_equals_unpipelined(tiny_config):
    common = ("model.num_layers=4", "model.drop_rate=0.1")
    ref_step, ref_state, ref, ref_eval = build(tiny_config(*common))
    pp_step, pp_state, pp, pp_eval = build(tiny_config(*common, "parallel.pipeline.size=2"))
    assert pp_state.params["layers"]["attention"]["wo"].sharding.mesh.shape["pipeline"] == 2

    for a, b in zip(ref, pp, strict=True):
        for k in ("loss", "grad_norm", "acc", "perplexity"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
        assert b["type_tokens"] == a["type_tokens"]
    np.testing.assert_allclose(pp_eval[0], ref_eval[0], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), pp_eval[1], ref_eval[1])

    # The stage shift is a collective-permute; the unpipelined step has none.
    assert "collective-permute" in pp_step.as_text() and "collective-permute" not in ref_step.as_text()
    # Each device holds half of the layer stack (layer l on stage l // 2) ...
    layers = jax.tree.leaves(pp_state.params["layers"])
    per_device = sum(x.addressable_shards[0].data.nbytes for x in layers)
    assert per_device * 2 == sum(x.nbytes for x in layers)
    # ... and the compiled step's arguments shrink by about that much (the layers are the bulk of the state).
    saved = ref_step.memory_analysis().argument_size_in_bytes - pp_step.memory_analysis().argument_size_in_bytes
    assert saved > 0.8 * per_device, (saved, per_device)


def test_check_pipeline(tiny_config):
    assert check_pipeline(tiny_config()) == 0.0
    cfg = tiny_config("model.num_layers=4", "parallel.pipeline.size=2", "data.micro_num=4")
    assert check_pipeline(cfg) == pytest.approx(1 / 5)  # (P - 1) / (M V + P - 1)
    with pytest.raises(ConfigError, match="num_layers 6 is not divisible by parallel.pipeline.size 2 x model.num"):
        check_pipeline(tiny_config("model.num_layers=6", "parallel.pipeline.size=2", "model.num_chunks=2"))
    with pytest.raises(ConfigError, match="data.micro_num=2 < parallel.pipeline.size 4"):
        check_pipeline(
            tiny_config("model.num_layers=8", "parallel.pipeline.size=4", "model.num_chunks=2", "data.micro_num=2")
        )
    # GPipe (one chunk) runs any micro_num, mostly bubble below P.
    cfg = tiny_config("model.num_layers=4", "parallel.pipeline.size=4", "data.micro_num=2")
    assert check_pipeline(cfg) == pytest.approx(3 / 5)
