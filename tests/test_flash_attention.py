"""The Pallas flash-attention kernels (interpret mode on CPU) against ``xla_attention``, and the attention dispatch.

Every run draws fresh inputs from a seed taken from ``os.urandom``; a failure prints the seed (rerun one with
``FLASH_TEST_SEED=<seed>``). Errors are ``max|got - want| / max|want|`` against the XLA reference in fp32 on the same
(dtype-rounded) inputs, for the output and for dq, dk, dv of a random-cotangent-weighted sum:
  * fp32 inputs: <= 1e-5 (seen: ~5e-7; only summation order differs);
  * bf16 inputs: <= 2e-2 (seen: ~5e-3, the same as XLA's own bf16 path against fp32; probabilities are rounded to
    bf16 before P.V in both).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internevo_jax.ops import attention as attn
from internevo_jax.ops.attention import xla_attention
from internevo_jax.ops.flash_attention import BlockSizes, _block_ranges, flash_attention

BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
BLOCKS = BlockSizes(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32)


def _seed() -> int:
    return int(os.environ.get("FLASH_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def _segments(kind: str, b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """[B, T] ids: one document (causal), or random documents with 0-id padding at either end of the row."""
    if kind == "causal":
        return np.ones((b, t), np.int32)
    rows = []
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(2, 6), replace=False))
        ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
        pad = int(rng.integers(1, t // 4))
        if r % 2:  # padding (id 0) at the end: the ids stop increasing along the row
            ids[t - pad :] = 0
        else:  # padding at the start
            ids[:pad] = 0
        rows.append(ids)
    return np.stack(rows).astype(np.int32)


CASES = {  # name: (B, T, K, G, H, segments)
    "causal_mqa": (1, 128, 1, 4, 64, "causal"),
    "packed_gqa": (2, 128, 2, 2, 32, "packed"),
    "odd_length_and_head_dim": (2, 100, 2, 2, 40, "packed"),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_xla_reference_outputs_and_gradients(case, dtype):
    b, t, kv, g, h, kind = CASES[case]
    seed = _seed()
    rng = np.random.default_rng(seed)
    seg = jnp.asarray(_segments(kind, b, t, rng))
    dt = jnp.dtype(dtype)
    q, k, v, w = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((b, t, kv, g, h), (b, t, kv, h), (b, t, kv, h), (b, t, kv, g, h))
    )
    q, k, v = (x.astype(dt).astype(jnp.float32) for x in (q, k, v))  # the reference sees the same rounded inputs

    def run(fn, compute_dtype):
        def loss(q, k, v):
            out = fn(q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype), seg)
            return (out.astype(jnp.float32) * w).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    want = run(xla_attention, jnp.float32)
    got = run(lambda *a: flash_attention(*a, block_sizes=BLOCKS, interpret=True), dt)
    assert got[0].dtype == dt
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.isfinite(x).all(), f"{name} has non-finite values (seed {seed})"
        err = np.abs(x - y).max() / np.abs(y).max()
        assert err <= BOUND[dtype], f"{case} {dtype} {name}: relative error {err:.2e} > {BOUND[dtype]} (seed {seed})"


def test_block_ranges_visit_exactly_the_blocks_with_a_visible_pair():
    """Packed rows (consecutive increasing ids): the kernels walk only blocks holding a visible (query, key) pair."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    t, bq, bk = 512, 32, 64
    lengths = rng.integers(1, 120, size=40)
    seg = np.repeat(np.arange(1, 41), lengths)[:t]
    seg = np.concatenate([seg, np.full(t - len(seg), seg[-1] + 1)]).astype(np.int32)[None]
    visible = (seg[0][:, None] == seg[0][None, :]) & np.tri(t, dtype=bool)
    want = visible.reshape(t // bq, bq, t // bk, bk).any(axis=(1, 3))  # [nq, nk]
    k_lo, k_hi, q_lo, q_hi = (np.asarray(x)[0] for x in _block_ranges(jnp.asarray(seg), bq, bk))
    nq, nk = want.shape
    by_q = np.array([[k_lo[i] <= j < k_hi[i] for j in range(nk)] for i in range(nq)])
    by_k = np.array([[q_lo[j] <= i < q_hi[j] for j in range(nk)] for i in range(nq)])
    np.testing.assert_array_equal(by_q, want, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(by_k, want, err_msg=f"seed {seed}")
    reachable = (np.arange(nk) * bk)[None, :] <= (np.arange(nq) * bq + bq - 1)[:, None]
    assert want.sum() < reachable.sum()  # documents of < 120 tokens in 512: most causal blocks are skipped


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_lowers_to_triton_for_an_h100():
    """Forward and backward lower to Triton kernels (no GPU needed: an abstract H100 as the target device)."""
    b, t, kv, g, h = 1, 256, 2, 2, 128
    q = jax.ShapeDtypeStruct((b, t, kv, g, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        return flash_attention(q, k, v, seg).astype(jnp.float32).sum()

    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton(") == 3  # forward, dq, dk/dv


def test_bench_attention_harness_runs_in_interpret_mode(tmp_path):
    """tools/bench_attention.py end to end on a tiny packed case (the GPU numbers come from the same code)."""
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = "--batch 1 --seq 64 --heads 2 --kv-heads 1 --head-dim 32 --impls pallas --cases packed --doc-len 8:24"
    argv += f" --pallas-blocks 32,32,32,32 --interpret --iters 1 --warmup 0 --json {out}"
    assert bench.main(argv.split()) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["correct"] and row["case"] == "packed" and 0 < row["useful_fraction"] < 1


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_gpu_kernels_refuse_cpu_with_a_pointer_to_xla(impl):
    q = jnp.zeros((1, 16, 1, 1, 16))
    k = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match=f"attn_impl='{impl}' needs a GPU.*'xla'"):
        attn.attention(q, k, k, jnp.ones((1, 16), jnp.int32), impl)


def test_auto_on_cpu_is_xla_and_says_so_once(caplog):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 16, 2, 16)), jnp.float32)
    seg = jnp.asarray(np.repeat([1, 2], 8)[None], jnp.int32)
    attn._said.clear()
    with caplog.at_level(logging.INFO, logger="internevo_jax"):
        out = jax.jit(lambda q, k: attn.attention(q, k, k, seg, "auto"))(q, k)
        attn.attention(q, k, k, seg, "auto")
    np.testing.assert_array_equal(out, jax.jit(xla_attention)(q, k, k, seg))
    lines = [r.getMessage() for r in caplog.records if "'auto'" in r.getMessage()]
    assert lines == ["attention impl 'auto': no flash kernel for backend 'cpu', using 'xla'"]
    assert all(r.levelno == logging.INFO for r in caplog.records if "'auto'" in r.getMessage())  # expected on CPU


def test_auto_on_gpu_falls_back_past_a_kernel_that_cannot_run(monkeypatch, caplog):
    """The GPU path of ``auto`` with the probe faked: cuDNN fails -> Pallas, logged; dropout -> xla, logged."""
    monkeypatch.setattr(attn, "probe", lambda impl, *a: "XlaRuntimeError: no plan" if impl == "cudnn" else None)
    attn._said.clear()
    q = jax.ShapeDtypeStruct((1, 128, 2, 2, 64), jnp.bfloat16)
    with caplog.at_level(logging.WARNING, logger="internevo_jax"):
        assert attn.resolve_impl("auto", q, backend="gpu") == "pallas"
        assert attn.resolve_impl("auto", q, backend="gpu") == "pallas"
        assert attn.resolve_impl("auto", q, dropout=True, backend="gpu") == "xla"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "'cudnn' cannot run here (XlaRuntimeError: no plan)" in lines[0]
    assert "dropout" in lines[1]


def test_auto_probes_the_shape_training_runs(monkeypatch):
    """The probe sees the real sequence length and heads (a kernel with no plan at T=4096 must not pass at T=128)."""
    seen = []
    monkeypatch.setattr(attn, "probe", lambda *a: seen.append(a) or ("no plan" if a[2] > 1024 else None))
    attn._said.clear()
    q = jax.ShapeDtypeStruct((4, 4096, 8, 2, 128), jnp.bfloat16)
    assert attn.resolve_impl("auto", q, backend="gpu") == "xla"  # neither kernel runs at this length
    assert seen == [(name, "bfloat16", 4096, 8, 2, 128) for name in attn.AUTO_GPU_ORDER]


def test_target_platform_resolves_for_a_gpu_without_probing(monkeypatch):
    """Lowering for a GPU on a CPU host: explicit kernels are allowed, ``auto`` is the head of the order, unprobed."""
    monkeypatch.setattr(attn, "probe", lambda *a: pytest.fail("probed a device that is not there"))
    q = jax.ShapeDtypeStruct((1, 128, 2, 2, 64), jnp.bfloat16)
    with attn.target_platform("gpu"):
        assert attn.resolve_impl("pallas", q) == "pallas"
        assert attn.resolve_impl("auto", q) == attn.AUTO_GPU_ORDER[0]
        assert attn.resolve_impl("auto", q, dropout=True) == "xla"
    with pytest.raises(ValueError, match="needs a GPU"):
        attn.resolve_impl("pallas", q)  # the override ends with the block


def test_probe_reports_why_a_kernel_cannot_run_even_inside_a_trace():
    attn.probe.cache_clear()
    inside = []
    shape = ("float32", 16, 1, 2, 16)  # seq, kv heads, groups, head dim
    jax.jit(lambda x: inside.append((attn.probe("xla", *shape), attn.probe("cudnn", *shape))) or x)(jnp.ones(2))
    ok, why = inside[0]
    assert ok is None and why and why.split(":")[0].isidentifier()


def test_tiny_model_with_the_kernel_matches_xla(tiny_config, monkeypatch):
    """The kernel inside the model (scanned layers, remat, packed rows): same loss and gradients as ``xla``.

    On CPU the dispatch refuses ``pallas``, so it is pointed at the interpreted kernel here.
    """
    from flax import nnx

    from internevo_jax.model import build_model

    cfg = tiny_config("model.checkpoint=True")
    seed = _seed()
    rng = np.random.default_rng(seed)
    b, t = 2, 32
    tokens = jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 14 + [0] * 7], b, 0), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(11), np.arange(14), np.arange(7)])[None].repeat(b, 0))

    def loss_and_grads(impl):
        cfg.model.attn_impl = impl
        model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens, positions, seg).astype(jnp.float32).std()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want = loss_and_grads("xla")
    blocks = BlockSizes(32, 32, 32, 32)
    monkeypatch.setattr(attn, "resolve_impl", lambda impl, *a, **k: impl)
    traced = []

    def kernel(q, k, v, s, max_segments=64):
        traced.append(q.shape)
        return flash_attention(q, k, v, s, block_sizes=blocks, interpret=True)

    monkeypatch.setitem(attn._KERNELS, "pallas", kernel)
    got_loss, got = loss_and_grads("pallas")
    assert traced, "the model did not reach the kernel"
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=f"seed {seed}")
    for (path, x), (_, y) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
        x, y = np.asarray(x.get_value()), np.asarray(y.get_value())
        err = np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)
        assert err <= 1e-5, f"{path}: relative error {err:.2e} (seed {seed})"


def test_vmapped_kernel_matches_xla():
    """Under ``jax.vmap`` (a leading stage axis, as a pipeline stacks them) Pallas adds a grid axis; still exact."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    s, b, t, kv, g, h = 2, 1, 64, 2, 2, 32
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((s, b, t, kv, g, h), (s, b, t, kv, h), (s, b, t, kv, h))
    )
    seg = jnp.asarray(np.stack([_segments("packed", b, t, rng) for _ in range(s)]))

    def run(fn):
        loss = lambda q, k, v, seg: (fn(q, k, v, seg) ** 2).sum()  # noqa: E731
        return jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1, 2))))(q, k, v, seg)

    got = run(lambda *a: flash_attention(*a, block_sizes=BLOCKS, interpret=True))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(run(xla_attention)), strict=True):
        err = float(jnp.abs(x - y).max() / jnp.abs(y).max())
        assert err <= BOUND["float32"], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize(
    "layout,local",
    [
        (("parallel.tensor.size=2",), (2, 32, 2, 1, 16)),  # rows over data x fsdp 4, kv heads over tensor 2
        (("parallel.tensor=dict(size=2, mode='isp')", "parallel.weight.size=2"), (2, 32, 2, 1, 16)),  # Ulysses
        (("parallel.pipeline.size=2", "parallel.tensor.size=2"), (4, 32, 2, 1, 16)),  # + the stage vmap
    ],
)
def test_kernel_runs_per_shard_under_every_layout(layout, local, tiny_config, monkeypatch):
    """Under a mesh the kernel is called per device shard (``mesh.per_shard``): it sees this device's rows and kv
    heads with whole sequences, and the train step still equals the 1-device ``xla`` step (loss and grad norm)."""
    from flax import nnx

    from internevo_jax.model import build_model

    from .test_parallel import BASE, SPLIT, Layout, split_batches

    cfg = tiny_config(*BASE, *SPLIT)
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(params=jax.random.key(0)))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    batches = split_batches(cfg, 1)
    want = Layout(cfg, jax.devices()[:1]).run(params, batches)

    monkeypatch.setattr(attn, "resolve_impl", lambda impl, *a, **k: impl)
    traced = []

    def kernel(q, k, v, s, max_segments=64):
        traced.append(q.shape)
        return flash_attention(q, k, v, s, block_sizes=BlockSizes(32, 32, 32, 32), interpret=True)

    monkeypatch.setitem(attn._KERNELS, "pallas", kernel)
    got = Layout(tiny_config(*BASE, *SPLIT, *layout, "model.attn_impl='pallas'"), jax.devices()).run(params, batches)
    assert set(traced) == {local}, traced  # [rows, T, K, G, H] of one device, not the global [8, 32, 4, 1, 16]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, impl",
    [
        ((), "auto"),
        (("model.use_flash_attn=False",), "xla"),
        (("model.use_flash_attn=False", "model.attn_impl='pallas'"), "pallas"),
    ],
)
def test_attention_kernel_from_config(tiny_config, overrides, impl):
    """Default ``auto`` (a flash kernel on a GPU); InternEvo's ``use_flash_attn=False`` turns it into plain ``xla``;
    an explicit ``attn_impl`` is kept."""
    from flax import nnx

    from internevo_jax.model import build_model

    cfg = tiny_config(*overrides)
    assert build_model(cfg.model_type, cfg.model, nnx.Rngs(0)).layers.attention.attn_impl == impl
