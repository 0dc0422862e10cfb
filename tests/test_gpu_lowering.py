"""The GPU path of the train step, lowered for CUDA on this CPU host (tools/lower_step.py): the Pallas kernels and
the cuDNN attention calls are built as on a GPU, so jax API drift in them fails CI, not the first GPU session."""

import importlib.util
import json
import subprocess
import sys

import jax
import pytest

from internevo_jax.ops import attention
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("lower_step", ROOT / "tools" / "lower_step.py")
lower_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lower_step)

TRITON = "__gpu$xla.gpu.triton"
CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
# bf16: cuDNN's flash attention takes 16-bit inputs only; 3 layers so the scanned layer body is not special-cased.
BASE = ("model.dtype='torch.bfloat16'", "model.num_layers=3")


def _calls(tiny_config, impl, devices, *overrides):
    cfg = tiny_config(*BASE, f"model.attn_impl='{impl}'", *overrides)
    with lower_step.assume_hopper():
        lowered = lower_step.lower_train_step(cfg, jax.devices()[:devices], "cuda")
    return lower_step.custom_calls(lowered.as_text())


@pytest.mark.parametrize(
    "devices, layout",
    [(1, ()), (8, ("parallel.tensor.size=2", "parallel.zero1.size=-1"))],
    ids=["1-device", "data4-x-tensor2-zero1"],
)
def test_pallas_step_lowers_to_its_triton_kernels(tiny_config, devices, layout):
    calls = _calls(tiny_config, "pallas", devices, *layout)
    # Forward, dQ and dK/dV: three kernels in the scanned layer body, no cuDNN call.
    assert calls.get(TRITON, 0) >= 3 and not any("cudnn" in c for c in calls), calls


@pytest.mark.parametrize(
    "devices, layout",
    [(1, ()), (8, ("parallel.tensor.size=2", "parallel.zero1.size=-1"))],
    ids=["1-device", "data4-x-tensor2-zero1"],
)
def test_cudnn_step_lowers_to_fused_attention(tiny_config, devices, layout):
    calls = _calls(tiny_config, "cudnn", devices, *layout)
    assert calls.get(CUDNN_FWD, 0) >= 1 and calls.get(CUDNN_BWD, 0) >= 1 and TRITON not in calls, calls


def test_auto_lowers_to_the_first_kernel_of_the_gpu_order(tiny_config, monkeypatch):
    """No device to probe: ``auto`` is the head of ``AUTO_GPU_ORDER``, whichever that is."""
    monkeypatch.setattr(attention, "AUTO_GPU_ORDER", ("pallas", "cudnn"))
    assert TRITON in _calls(tiny_config, "auto", 1)
    monkeypatch.setattr(attention, "AUTO_GPU_ORDER", ("cudnn", "pallas"))
    assert CUDNN_FWD in _calls(tiny_config, "auto", 1)


def test_without_the_stated_target_jax_refuses_cudnn_on_a_cpu_host(tiny_config):
    """Why ``assume_hopper`` exists: jax's wrapper asks the local GPU for its cuDNN version while tracing."""
    cfg = tiny_config(*BASE, "model.attn_impl='cudnn'")
    with pytest.raises((RuntimeError, NotImplementedError)):
        lower_step.lower_train_step(cfg, jax.devices()[:1], "cuda")


def test_cli_prints_the_kernels(tmp_path):
    out = tmp_path / "calls.json"
    cmd = [sys.executable, str(ROOT / "tools" / "lower_step.py"), f"--config={ROOT / 'configs' / 'tiny.py'}"]
    cmd += ["--config.model.attn_impl=pallas", "--devices", "2", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lowered for cuda on 2 device(s): attn_impl=pallas" in r.stdout and TRITON in r.stdout
    assert json.loads(out.read_text())[TRITON] >= 3
