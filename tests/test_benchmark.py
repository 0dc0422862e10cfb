"""MFU pieces of monitoring/metrics.py (peak table, mfu) and tools/benchmark.py end to end on 8 fake CPU devices."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from internevo_jax import config as config_lib
from internevo_jax.monitoring.metrics import causal_flops_per_token, mfu, peak_tflops

from .conftest import ROOT


@pytest.mark.parametrize(
    "kind, bf16, fp32",
    [
        ("NVIDIA H100 80GB HBM3", 989.4, 494.7),
        ("NVIDIA H100 PCIe", 756.0, 378.0),
        ("NVIDIA H100 NVL", 835.5, 417.5),
        ("NVIDIA H200", 989.4, 494.7),
        ("NVIDIA GH200 480GB", 989.4, 494.7),
        ("NVIDIA H800", 989.4, 494.7),
        ("NVIDIA H20", 148.0, 74.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
        ("NVIDIA A100-SXM4-40GB", 312.0, 156.0),
        ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
        ("NVIDIA A800-SXM4-80GB", 312.0, 156.0),
        ("NVIDIA L40S", 362.0, 183.0),
        ("NVIDIA L40", 181.0, 90.5),
        ("nvidia h100 80gb hbm3", 989.4, 494.7),  # case does not matter
    ],
)
def test_peak_tflops_by_device_kind(kind, bf16, fp32):
    assert peak_tflops(kind, "bfloat16") == bf16
    assert peak_tflops(kind, "torch.float16") == bf16
    assert peak_tflops(kind, "float32") == fp32  # TF32 tensor cores (see metrics.PEAK_TFLOPS)
    assert peak_tflops(kind, "torch.tf32") == fp32


@pytest.mark.parametrize("kind", ["cpu", "TFRT_CPU_0", "NVIDIA L4", "NVIDIA GeForce RTX 4090", "TPU v5 lite", ""])
def test_peak_tflops_unknown_device_is_none(kind):
    assert peak_tflops(kind, "bfloat16") is None


def test_peak_tflops_unknown_dtype_fails_loudly():
    with pytest.raises(ValueError, match="float8"):
        peak_tflops("NVIDIA H100 80GB HBM3", "float8")


def test_mfu():
    assert mfu(1e9, 1000.0, None) is None
    assert mfu(1e9, 1000.0, 0.0) is None
    assert mfu(11.41e9, 39_000.0, 989.4) == pytest.approx(0.4497, abs=1e-4)  # 1.8B at 39k tokens/s on an H200: 45%
    assert mfu(0.0, 1000.0, 312.0) == 0.0


def _expected_params(cfg) -> int:
    """Parameter count of an InternLM2 (no biases, untied head) from the config alone."""
    m = cfg.model
    d, hd = m.hidden_size, m.hidden_size // m.num_attention_heads
    f = config_lib.ffn_width(d, m.mlp_ratio, m.multiple_of)
    attn = d * (m.num_attention_heads + 2 * m.num_kv_attention_heads) * hd + m.num_attention_heads * hd * d
    per_layer = attn + 3 * d * f + 2 * d  # + attention_norm, ffn_norm
    return m.num_layers * per_layer + 2 * m.vocab_size * d + d  # + embeddings, output head, final norm


def test_benchmark_tool_on_tiny(tmp_path, tiny_config):
    out = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), f"--config={ROOT / 'configs' / 'tiny.py'}"]
    # The user's ckpt/data choices are overridden: no checkpoint is written and no data folder is read.
    cmd += ["--config.data.micro_bsz=1", "--config.ckpt.enable_save_ckpt=True", "--config.data.train_folder='/nope'"]
    cmd += ["--steps", "3", "--warmup", "1", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [out]  # nothing else (no RUN/, no checkpoint) in the working folder
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| date |") and "n/a (unknown peak for cpu)" in lines[2]

    res = json.loads(out.read_text())
    cfg = tiny_config("data.micro_bsz=1")
    assert res["device_kind"] == "cpu" and res["device_count"] == 8
    assert res["num_params"] == _expected_params(cfg) == 155_968
    assert res["global_batch_tokens"] == cfg.data.micro_num * 8 * cfg.data.seq_len  # dp = 8, micro_bsz 1
    assert len(res["step_seconds"]) == 3 and min(res["step_seconds"]) > 0
    assert res["step_seconds_median"] == sorted(res["step_seconds"])[1]
    tgs = res["global_batch_tokens"] / 8 / res["step_seconds_median"]
    assert res["tokens_per_second_per_device"] == pytest.approx(tgs) and tgs > 0
    assert res["flops_per_token_causal"] == causal_flops_per_token(cfg.model, cfg.data.seq_len)
    assert res["mfu"] is None and res["peak_tflops"] is None
    assert res["tflops_megatron"] > 0 and res["compile_seconds"] > 0
    assert res["peak_memory_source"] == "estimate" and res["peak_memory_bytes"] > 0
    assert math.isfinite(res["final_loss"])
    assert res["jax_version"] and res["jaxlib_version"] and res["dtype"] == "float32"


def test_benchmark_table_on_a_known_device():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    row = dict(
        date="2026-11-22 12:00",
        config="configs/internlm2_1_8b.py",
        device_kind="NVIDIA H100 80GB HBM3",
        device_count=1,
        jax_version="0.11.2",
        jaxlib_version="0.11.2",
        dtype="bfloat16",
        num_params=1_889_000_000,
        global_batch_tokens=8192,
        tokens_per_second_per_device=39000.0,
        step_seconds_median=0.21,
        compile_seconds=61.0,
        mfu=0.4497,
        peak_tflops=989.4,
        tflops_megatron=300.0,
        peak_memory_bytes=70 * 2**30,
        peak_memory_source="memory_stats",
    )
    header, rule, cells = tool.table(row).splitlines()
    assert header.count("|") == rule.count("|") == cells.count("|")
    assert "45.0% of 989.4" in cells and "70.00 GiB |" in cells and "1889.00M" in cells and "210.0 ms" in cells


def test_torch_peer_trains_the_same_shape(tmp_path):
    """tools/bench_torch_peer.py: the transformers model of the config's shape has our parameter count, and the row
    reports the same batch of tokens per step as tools/benchmark.py would."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "peer.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_torch_peer.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
         "--steps=2", "--warmup=1", f"--json={out}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| LlamaForCausalLM, attn sdpa |" in run.stdout
    r = json.loads(out.read_text())
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    import jax
    from flax import nnx

    from internevo_jax.model import build_model

    ours = nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0)))
    assert r["num_params"] == sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(ours)))
    assert r["global_batch_tokens"] == cfg.data.micro_num * cfg.data.micro_bsz * cfg.data.seq_len
    assert len(r["step_seconds"]) == 2 and math.isfinite(r["final_loss"])
