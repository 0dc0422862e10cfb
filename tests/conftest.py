"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config():
    """Builds the tiny config with overrides: tiny_config("data.total_steps=4", ...)."""
    from internevo_jax import config as config_lib

    def make(*overrides: str):
        return config_lib.load(ROOT / "configs" / "tiny.py", [f"--config.{o}" for o in overrides])

    return make
