"""Every parallel layout computes the 1-device step (issue #6): same global batch, same init, loss and grad_norm equal
within 1e-5 relative for three steps; per-device memory and the collectives in the compiled step are what the
layout says they should be.

Each layout runs the batch as micro_num 4 x micro_bsz 1 while the 1-device reference runs it as micro_num 2 x
micro_bsz 2 (two packed rows side by side), so every comparison also checks InternEvo's micro_num <-> micro_bsz
invariance under that layout. The invariance is exact here because every seq_len slice holds the same number of
labelled tokens (three documents each), so the mean of per-row means equals the mean over slices.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from internevo_jax import mesh as mesh_lib
from internevo_jax.optim import make_optimizer
from internevo_jax.step import TrainState, abstract_model, make_train_step, state_shardings

ROWS, STEPS = 8, 3
BASE = ("model.num_layers=4", "model.num_kv_attention_heads=4", "data.total_steps=3")
PACKED = ("data.micro_num=2", "data.micro_bsz=2")  # the reference's geometry: [2, ROWS, 2 x seq_len]
SPLIT = ("data.micro_num=4", "data.micro_bsz=1")  # the layouts': [4, ROWS, seq_len]
LAYOUTS = {
    "data 8 (zero1 off)": ("parallel.zero1.size=1",),
    "zero1 -1": ("parallel.zero1.size=-1",),
    "zero1 4": ("parallel.zero1.size=4",),
    "fsdp 8": ("parallel.zero1.fsdp=True",),
    "mtp 2": ("parallel.tensor.size=2",),
    "mtp 4": ("parallel.tensor.size=4",),
    "msp 2": ("parallel.tensor=dict(size=2, mode='msp')",),
    "msp 4": ("parallel.tensor=dict(size=4, mode='msp')",),
    "fsp 2": ("parallel.tensor=dict(size=2, mode='fsp')",),
    "fsp 4": ("parallel.tensor=dict(size=4, mode='fsp')",),
    "isp 2, weight 2": ("parallel.tensor=dict(size=2, mode='isp')", "parallel.weight.size=2"),
    # InternEvo's 7B_isp_sft.py: the weight group (4 ranks) spans the isp group (2) and 2 data-parallel ranks
    "isp 2, weight 4": ("parallel.tensor=dict(size=2, mode='isp')", "parallel.weight=dict(size=4, overlap=True)"),
    "fsdp 4 x tensor 2": ("parallel.zero1=dict(size=-1, fsdp=True)", "parallel.tensor.size=2"),
    "pipeline 2": ("parallel.pipeline.size=2",),
    "pipeline 4": ("parallel.pipeline.size=4",),
    "pipeline 2, num_chunks 2": ("parallel.pipeline.size=2", "model.num_chunks=2"),
    "pipeline 2 x tensor 2 x data 2": ("parallel.pipeline.size=2", "parallel.tensor.size=2"),
}


def split_batches(cfg, n):
    """n global batches [4, ROWS, seq_len] of random packed documents, three per row (two random cuts), positions
    restarting at each document and the last token of each labelled -100."""
    rng = np.random.default_rng(0)
    p, vocab = cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, size=(4, ROWS, p), dtype=np.int32)
        cuts = np.stack([rng.choice(np.arange(1, p), size=2, replace=False) for _ in range(4 * ROWS)])
        cuts = np.sort(cuts, axis=-1).reshape(4, ROWS, 2)
        seg = (np.arange(p)[None, None, :, None] >= cuts[..., None, :]).sum(-1).astype(np.int32) + 1
        starts = np.concatenate([np.ones_like(seg[..., :1]), (seg[..., 1:] != seg[..., :-1])], -1).astype(bool)
        idx = np.where(starts, np.arange(p), 0)
        positions = (np.arange(p) - np.maximum.accumulate(idx, axis=-1)).astype(np.int32)
        labels = np.concatenate([tokens[..., 1:], np.full_like(tokens[..., :1], -100)], -1)
        labels = np.where(np.concatenate([seg[..., 1:] == seg[..., :-1], np.zeros_like(seg[..., :1], bool)], -1),
                          labels, -100).astype(np.int32)  # fmt: skip
        out.append(dict(tokens=tokens, labels=labels, positions=positions, segment_ids=seg, type_ids=0 * tokens))
    return out


def packed(batch):
    """The same tokens as [2, ROWS, 2 x seq_len]: micro-batches 2k and 2k + 1 side by side in micro-batch k, the
    second slice's documents numbered after the first's (segment ids 4..6), as a packer of micro_bsz 2 lays them."""

    def pair(x, offset=0):
        m, r, p = x.shape
        x = x.reshape(m // 2, 2, r, p) + offset * np.arange(2).reshape(1, 2, 1, 1)
        return x.transpose(0, 2, 1, 3).reshape(m // 2, r, 2 * p)

    return {k: pair(v, 3 if k == "segment_ids" else 0) for k, v in batch.items()}


class Layout:
    """The train step of one ``parallel`` layout on ``devices``, fed a fixed global batch of ROWS rows."""

    def __init__(self, cfg, devices):
        self.cfg, self.mesh = cfg, mesh_lib.make_mesh(cfg.parallel, devices)
        self.rules = mesh_lib.rules(cfg.parallel)
        self.graphdef, abstract = abstract_model(cfg)
        tx = make_optimizer(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler)
        self.init_state = jax.jit(lambda p: TrainState(p, tx.init(p), _scale(), jax.numpy.int32(0)))
        params = mesh_lib.param_shardings(abstract, self.mesh, self.rules)
        self.abstract = jax.eval_shape(self.init_state, jax.tree.map(lambda s: s, _pure(abstract)))
        self.shardings = state_shardings(self.abstract, params)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        step = make_train_step(cfg, self.graphdef, tx, 3)
        with mesh_lib.activate(self.mesh, self.rules):
            shape = (cfg.data.micro_num, ROWS, cfg.data.packed_length)
            batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in FIELDS}
            self.compiled = (
                jax.jit(
                    step,
                    in_shardings=(self.shardings, self.batch_sharding),
                    out_shardings=(self.shardings, NamedSharding(self.mesh, PartitionSpec())),
                )
                .lower(self.abstract, batch)
                .compile()
            )

    def run(self, host_params, batches):
        state = jax.device_put(self.init_state(host_params), self.shardings)
        out = []
        for b in batches:
            state, metrics = self.compiled(state, jax.device_put(b, self.batch_sharding))
            out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return out


FIELDS = ("tokens", "labels", "positions", "segment_ids", "type_ids")


def _scale():
    from internevo_jax.optim import LossScale

    return LossScale(jax.numpy.float32(1.0), jax.numpy.int32(0), jax.numpy.int32(0))


def _pure(abstract):
    from flax import nnx

    return nnx.to_pure_dict(abstract)


_LAYOUTS: dict[tuple[str, ...], Layout] = {}


def layout_for(tiny_config, *overrides, devices=None) -> Layout:
    """One compiled Layout per override set and device count, shared by the tests of this module."""
    devices = devices or jax.devices()
    key = (len(devices), *overrides)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = Layout(tiny_config(*overrides), devices)
    return _LAYOUTS[key]


@pytest.fixture(scope="module")
def reference():
    """The 1-device run (micro_num 2 x micro_bsz 2), the host params every layout starts from, and the batches."""
    from flax import nnx

    from internevo_jax import config as config_lib
    from internevo_jax.model import build_model

    from .conftest import ROOT

    cfg = config_lib.load(ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in BASE + PACKED])
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(params=jax.random.key(0)))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    batches = split_batches(cfg, STEPS)
    ref = Layout(cfg, jax.devices()[:1]).run(params, [packed(b) for b in batches])
    return params, batches, ref


def test_micro_num_and_micro_bsz_swap_on_one_device(reference, tiny_config):
    params, batches, ref = reference
    got = layout_for(tiny_config, *BASE, *SPLIT, devices=jax.devices()[:1]).run(params, batches)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_device(name, reference, tiny_config):
    params, batches, ref = reference
    layout = layout_for(tiny_config, *BASE, *SPLIT, *LAYOUTS[name])
    got = layout.run(params, batches)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, err_msg=name)
    hlo = layout.compiled.as_text()
    if "isp" in name:  # Ulysses: the sequence-sharded activations switch to head sharding inside attention
        assert "all-to-all" in hlo
    if "mtp" in name or "msp" in name or "fsp" in name:
        assert "all-reduce" in hlo or "reduce-scatter" in hlo
    if "fsdp" in name or "weight" in name:  # sharded weights are gathered per use
        assert "all-gather" in hlo
    if "pipeline" in name:  # the stage shift
        assert "collective-permute" in hlo


# New families (#21) under the layouts their extra weights meet: Qwen2's q/k/v biases are split with the heads and its
# tied head is the vocab-sharded embedding table; Gemma's head dim (32) is its own and its head tied too.
FAMILIES = {
    "QWEN2": ("model_type='QWEN2'", "model.tie_word_embeddings=True"),
    "GEMMA": ("model_type='GEMMA'", "model.head_dim=32"),
}
FAMILY_LAYOUTS = {
    "QWEN2, mtp 2": ("QWEN2", LAYOUTS["mtp 2"]),
    "QWEN2, fsdp 4 x tensor 2": ("QWEN2", LAYOUTS["fsdp 4 x tensor 2"]),
    "QWEN2, pipeline 2 x tensor 2 x data 2": ("QWEN2", LAYOUTS["pipeline 2 x tensor 2 x data 2"]),
    "GEMMA, msp 2": ("GEMMA", LAYOUTS["msp 2"]),
}
_FAMILY_REFERENCES: dict = {}


def family_reference(tiny_config, family):
    """As ``reference`` for a family, its biases and norm weights random (so a wrong split of them shows)."""
    if family not in _FAMILY_REFERENCES:
        from .conftest import random_tiny_model

        cfg = tiny_config(*BASE, *PACKED, *FAMILIES[family])
        _, params = random_tiny_model(cfg, seed=5)
        params = jax.device_get(params)
        batches = split_batches(cfg, STEPS)
        ref = Layout(cfg, jax.devices()[:1]).run(params, [packed(b) for b in batches])
        _FAMILY_REFERENCES[family] = params, batches, ref
    return _FAMILY_REFERENCES[family]


@pytest.mark.parametrize("name", list(FAMILY_LAYOUTS))
def test_family_layout_matches_one_device(name, tiny_config):
    family, overrides = FAMILY_LAYOUTS[name]
    params, batches, ref = family_reference(tiny_config, family)
    if family == "QWEN2":
        assert "bqkv" in params["layers"]["attention"] and "output" not in params
    got = layout_for(tiny_config, *BASE, *SPLIT, *FAMILIES[family], *overrides).run(params, batches)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, err_msg=name)


def test_memory_per_device_follows_the_sharding(tiny_config):
    """Params + Adam moments per device: replicated 3N; ZeRO-1 over 8 -> N + 2N/8; FSDP over 8 -> 3N/8."""

    def state_bytes(*overrides):
        layout = layout_for(tiny_config, *BASE, *SPLIT, *overrides)  # compiled already by the layout tests
        shards = [
            np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
            for a, s in zip(jax.tree.leaves(layout.abstract), jax.tree.leaves(layout.shardings), strict=True)
        ]
        return sum(shards), layout.compiled.memory_analysis().argument_size_in_bytes

    (full, full_args), (zero, zero_args), (fsdp, fsdp_args) = (
        state_bytes(*LAYOUTS["data 8 (zero1 off)"]),
        state_bytes(*LAYOUTS["zero1 -1"]),
        state_bytes(*LAYOUTS["fsdp 8"]),
    )
    assert zero / full == pytest.approx((1 + 2 / 8) / 3, rel=0.05)
    assert fsdp / full == pytest.approx(1 / 8, rel=0.1)
    # The compiled step's inputs per device (state + this device's batch rows) shrink the same way.
    assert fsdp_args < 0.2 * full_args and zero_args < 0.5 * full_args


def test_isp_weight_group_spans_sequence_and_data(tiny_config):
    """isp 2 x weight 4 (InternEvo's 7B_isp_sft.py layout) on 8 devices: the block weights are split over weight
    groups of 4 contiguous ranks ({0..3}, {4..7}: two isp pairs each) and repeated across the weight-data-parallel
    pairs {k, k + 4}; ZeRO runs over those pairs, so the Adam moments are split 8 ways."""
    layout = layout_for(tiny_config, *BASE, *SPLIT, *LAYOUTS["isp 2, weight 4"])  # compiled by the layout test
    assert dict(layout.mesh.shape) == dict(pipeline=1, data=1, fsdp=2, expert=1, weight=2, sequence=2, tensor=1)
    assert mesh_lib.data_parallel_size(layout.mesh) == 4  # batch rows: world 8 / sequence 2
    wqkv = layout.abstract.params["layers"]["attention"]["wqkv"]
    sharding = layout.shardings.params["layers"]["attention"]["wqkv"]
    shards = {d.id: idx for d, idx in sharding.devices_indices_map(wqkv.shape).items()}
    assert len({str(shards[d]) for d in range(4)}) == 4  # one weight group holds 4 distinct shards
    assert all(shards[d] == shards[d + 4] for d in range(4))  # the other group holds the same ones
    assert np.prod(sharding.shard_shape(wqkv.shape)) * 4 == np.prod(wqkv.shape)
    moments = [
        s
        for a, s in zip(
            jax.tree.leaves(layout.abstract.opt_state), jax.tree.leaves(layout.shardings.opt_state), strict=True
        )
        if a.shape == wqkv.shape
    ]
    assert len(moments) == 2 and all(np.prod(m.shard_shape(wqkv.shape)) * 8 == np.prod(wqkv.shape) for m in moments)


def test_bad_layouts_fail_with_the_arithmetic(tiny_config):
    from internevo_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"world 8 is not divisible by pipeline 1 x tensor 3 = 3"):
        mesh_lib.make_mesh(tiny_config("parallel.tensor.size=3").parallel)
    with pytest.raises(ConfigError, match=r"zero1.size=3 does not divide the data-parallel size 8"):
        mesh_lib.make_mesh(tiny_config("parallel.zero1.size=3").parallel)

    def isp(size, weight, *more):
        return tiny_config(f"parallel.tensor=dict(size={size}, mode='isp')", f"parallel.weight.size={weight}", *more)

    with pytest.raises(
        ConfigError,
        match=r"weight.size=3: the weight group is the isp group \(sequence size 2 = parallel.tensor.size\) times "
        r"a block of data-parallel ranks, so it must be a multiple of 2 that divides world 8 / pipeline 1 = 8 ranks "
        r"per stage; set parallel.weight.size to one of \[1, 2, 4, 8\]",
    ):
        mesh_lib.make_mesh(isp(2, 3).parallel)
    with pytest.raises(ConfigError, match=r"weight.size=2: .* multiple of 4 .* one of \[1, 4, 8\]"):
        mesh_lib.make_mesh(isp(4, 2).parallel)  # a weight group inside the isp group: InternEvo has it, we do not
    with pytest.raises(ConfigError, match=r"weight.size=8: .* world 8 / pipeline 2 = 4 ranks .* one of \[1, 2, 4\]"):
        mesh_lib.make_mesh(isp(2, 8, "parallel.pipeline.size=2").parallel)
    with pytest.raises(
        ConfigError,
        match=r"zero1.size=4 does not divide the weight-data-parallel size 2 \(world 8 / pipeline 1 / weight 4\)",
    ):
        mesh_lib.make_mesh(isp(2, 4, "parallel.zero1.size=4").parallel)
