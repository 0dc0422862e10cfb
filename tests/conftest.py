"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache per test session, inherited by the subprocesses the tests start: the tiny
    # config's step is compiled by dozens of runs (resume, fault and launcher tests), each compile ~2-5 s on 2 cores.
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="internevo_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import importlib.util  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The processes the tests start (tools/*.py, launch.py, python -m ...) import this checkout's package and tools/, not
# an installed copy: the tools no longer put their checkout on sys.path themselves.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# What CI installs on Python 3.11 for the parity and Hugging Face data tests (.ci/run: extras dev,parity,hf; DESIGN.md,
# Versions). Those tests skip where a module is missing, which is right on a laptop and on 3.12 (no torch build), but
# in CI on 3.11 a missing one would turn every parity test into a quiet skip and CI green: there it is an error.
CI_REQUIRED_ON_311 = ("torch", "transformers", "safetensors", "datasets", "pyarrow")


def missing_ci_modules(
    env: Mapping[str, str] = os.environ,
    version: tuple[int, int] = sys.version_info[:2],
    find: Callable[[str], object] = importlib.util.find_spec,
) -> list[str]:
    """The modules of ``CI_REQUIRED_ON_311`` that are missing, when this is CI (CI=true) on Python 3.11; else []."""
    if env.get("CI", "").lower() != "true" or tuple(version) != (3, 11):
        return []
    return [name for name in CI_REQUIRED_ON_311 if find(name) is None]


def pytest_configure(config):
    missing = missing_ci_modules()
    if missing:
        raise pytest.UsageError(
            f"CI=true on Python 3.11 but {', '.join(missing)} cannot be imported: the parity tests would all be "
            "skipped. Install the extras CI uses (pip install torch==2.13.0 && pip install -e '.[dev,parity,hf]'), "
            "or unset CI for a local run"
        )


@pytest.fixture
def tiny_config():
    """Builds the tiny config with overrides: tiny_config("data.total_steps=4", ...)."""
    from internevo_jax import config as config_lib

    def make(*overrides: str):
        return config_lib.load(ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in overrides])

    return make


def random_tiny_model(cfg, seed=3):
    """A model of ``cfg`` with random (not zero) biases and norm weights, so every weight mapping is exercised.

    Returns the model and its params as a pure dict of jax arrays (already written back into the model).
    """
    import jax
    from flax import nnx

    from internevo_jax.model import build_model

    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
    attn, layers = params["layers"]["attention"], params["layers"]
    for holder, name in [
        (attn, "bqkv"),
        (attn, "bo"),
        (layers["attention_norm"], "weight"),
        (params["norm"], "weight"),
    ]:
        if name in holder:
            holder[name] = holder[name] + 0.1 * jax.random.normal(next(keys), holder[name].shape)
    nnx.update(model, params)
    return model, params


def random_hf_llama(folder, dtype=None, head_scale=1.0, max_shard_size="5GB", **kw):
    """A tiny random ``transformers`` Llama (vocab 256, 2 layers, GQA 4/2) saved to ``folder``; returns the model.

    Weights are nudged off their init (norms away from 1, biases from 0) so every mapping is exercised;
    ``head_scale`` spreads the logits so greedy paths do not hinge on float rounding.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        **kw,
    )
    model = transformers.LlamaForCausalLM(hf_cfg)
    model = (model if dtype is None else model.to(dtype)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


@pytest.fixture
def logs():
    """Records of the package logger (it does not propagate, so caplog does not see it)."""
    import logging

    from internevo_jax.monitoring.logger import get_logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    get_logger().addHandler(handler)
    yield records
    get_logger().removeHandler(handler)
