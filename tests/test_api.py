"""The public API as a user's script uses it: the README's example runs, a registered model type trains and
checkpoints, and the same custom model trains under data + tensor parallelism."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT


def readme_script():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_script(path, *args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return subprocess.run(
        [sys.executable, str(path), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_readme_script_trains_a_registered_model_and_checkpoints(tmp_path):
    script = tmp_path / "my_train.py"
    script.write_text(readme_script())
    ckpt = tmp_path / "ckpt"
    common = (
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.model_type=TOY_LM",
        "--config.data.total_steps=6",
        "--config.ckpt.enable_save_ckpt=True",
        f"--config.ckpt.save_ckpt_folder=local:{ckpt}",
        "--config.ckpt.checkpoint_every=3",
        "--launcher=local",
        "--steps-note=hello",
    )
    out = run_script(script, *common, f"--config.run_folder={tmp_path / 'run'}", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "hello 6 steps" in out.stdout
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["3", "6"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-2:]]) < np.mean([r["loss"] for r in rows[:2]])
    # The same custom model under data 4 x tensor 2 (its "vocab"/"mlp" dims split over the tensor axis).
    out = run_script(
        script,
        *common[:3],
        "--config.parallel.tensor.size=2",
        "--config.ckpt.enable_save_ckpt=False",
        f"--config.run_folder={tmp_path / 'tp'}",
        "--launcher=local",
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "'tensor': 2" in out.stdout and " 6 steps" in out.stdout


def test_unknown_model_type_lists_the_registered_ones(tiny_config):
    from internevo_jax import ConfigError

    with pytest.raises(ConfigError, match=r"model_type='NOPE' is unknown; registered: \[.*'INTERNLM2'.*register_model"):
        tiny_config("model_type='NOPE'")


def test_register_model_refuses_a_second_builder_for_a_name():
    from internevo_jax import register_model
    from internevo_jax.model import Decoder

    register_model("INTERNLM2", Decoder)  # the same builder again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_model("INTERNLM2", lambda cfg, rngs: None)
