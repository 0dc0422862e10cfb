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


def readme_snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def readme_script():
    return readme_snippets()[0]


def readme_loop_script():
    """my_train.py as the README's second snippet says: its ``train_loop`` added and called instead of ``fit()``."""
    script, loop = readme_snippets()[:2]
    fit, main = "summary = trainer.fit()", 'if __name__ == "__main__":'
    assert script.count(fit) == 1 and script.count(main) == 1 and "def train_loop(trainer, config):" in loop
    return script.replace(main, loop + "\n\n" + main).replace(fit, "summary = train_loop(trainer, config)")


def run_script(path, *args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return subprocess.run(
        [sys.executable, str(path), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def readme_args(tmp_path, name):
    """The flags both README scripts run with: 6 steps, a checkpoint every 3, validation (one batch) every 3."""
    return (
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.model_type=TOY_LM",
        "--config.data.total_steps=6",
        "--config.data.valid_every=3",
        "--config.data.valid_micro_num=250",  # the dummy set's 500 rows per rank in one batch
        "--config.ckpt.enable_save_ckpt=True",
        f"--config.ckpt.save_ckpt_folder=local:{tmp_path / name / 'ckpt'}",
        "--config.ckpt.checkpoint_every=3",
        f"--config.run_folder={tmp_path / name / 'run'}",
        "--launcher=local",
        "--steps-note=hello",
    )


@pytest.fixture(scope="module")
def readme_fit_run(tmp_path_factory):
    """The README's first script, run once: (its folder, the process output)."""
    tmp_path = tmp_path_factory.mktemp("readme")
    script = tmp_path / "my_train.py"
    script.write_text(readme_script())
    return tmp_path, run_script(script, *readme_args(tmp_path, "fit"), tmp_path=tmp_path)


def metrics_rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_readme_script_trains_a_registered_model_and_checkpoints(readme_fit_run):
    tmp_path, out = readme_fit_run
    script, ckpt = tmp_path / "my_train.py", tmp_path / "fit" / "ckpt"
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "hello 6 steps" in out.stdout
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["3", "6"]
    rows = [r for r in metrics_rows(tmp_path / "fit" / "run") if "loss" in r]
    assert np.mean([r["loss"] for r in rows[-2:]]) < np.mean([r["loss"] for r in rows[:2]])
    common = readme_args(tmp_path, "tp")
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


def test_readme_train_loop_equals_fit(readme_fit_run):
    """The README's second snippet, in my_train.py as it says, computes fit()'s losses, validation and checkpoints."""
    tmp_path, fit_out = readme_fit_run
    assert fit_out.returncode == 0, fit_out.stdout[-3000:] + fit_out.stderr[-3000:]
    script = tmp_path / "my_loop.py"
    script.write_text(readme_loop_script())
    out = run_script(script, *readme_args(tmp_path, "loop"), tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "hello 6 steps" in out.stdout

    def numbers(name):  # per row: the step and what the model computed (not the timings)
        keys = ("step", "loss", "grad_norm", "num_consumed_tokens", "val/val_loss", "val/val_acc")
        return [{k: r[k] for k in keys if k in r} for r in metrics_rows(tmp_path / name / "run")]

    assert numbers("loop") == numbers("fit")  # the same floats, step by step
    assert any("val/val_loss" in r for r in numbers("loop"))
    from internevo_jax.checkpoint.arrays import read_meta

    for step in ("3", "6"):
        loop, fit = read_meta(tmp_path / "loop" / "ckpt" / step), read_meta(tmp_path / "fit" / "ckpt" / step)
        assert {k: loop[k] for k in ("batch_count", "step_count", "num_consumed_tokens", "data_state")} == {
            k: fit[k] for k in ("batch_count", "step_count", "num_consumed_tokens", "data_state")
        }


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


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r] + [
        (r["step"], r["val/a_loss"]) for r in rows if "val/a_loss" in r
    ]


def test_custom_loop_with_the_public_pieces_equals_fit(tiny_config, tmp_path):
    """A loop written with initial_state / batches / train_step / log_step / evaluate / save_checkpoint computes
    exactly what fit() does, from the InternEvo-named builders, and leaves a checkpoint a later run resumes."""
    import internevo_jax as ie
    from internevo_jax.checkpoint.arrays import read_meta

    from .test_tokenized import write_bin

    rng = np.random.default_rng(0)  # one small validation set: 2 rows per rank (dp 4), one batch
    write_bin(tmp_path / "valid" / "a" / "v.bin", [rng.integers(1, 200, size=60) for _ in range(8)])
    common = ("data.total_steps=4", "data.valid_every=2", f"data.valid_folder='{tmp_path / 'valid'}'")
    common += ("parallel.tensor.size=2", "ckpt.checkpoint_every=4")
    ie.Trainer(tiny_config(*common, f"run_folder='{tmp_path / 'fit'}'")).fit()

    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(
        *common,
        f"run_folder='{tmp_path / 'loop'}'",
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='local:{ckpt}'",
    )
    mesh = ie.make_mesh(cfg.parallel)
    train_dl, types = ie.build_train_loader_with_data_type(cfg, mesh)
    val_dls = ie.build_valid_loader_with_data_type(cfg, mesh)
    trainer = ie.TrainerBuilder(ie.initialize_model(cfg), train_dl, val_dls, config=cfg, dataset_types=types)
    state, meta = trainer.initial_state()
    batches = trainer.batches(meta)
    consumed, results = 0, {}
    for k in range(meta["batch_count"], cfg.data.total_steps):
        item = next(batches)
        state, metrics = trainer.train_step(state, trainer.to_device(item["batch"]))
        consumed += cfg.data.micro_num * cfg.data.packed_length * trainer.dp
        values = trainer.log_step(k, metrics, item["stats"], consumed, cfg.data.micro_num, seconds=1.0)
        if (k + 1) % cfg.data.valid_every == 0:
            results = trainer.evaluate(state.params, k + 1, int(values["step_count"]))
    trainer.save_checkpoint(cfg.data.total_steps, state, batches, consumed)
    trainer.close()

    assert _losses(tmp_path / "loop") == _losses(tmp_path / "fit")  # the same floats, step by step
    assert set(results) == {"a"} and np.isfinite(results["a"]["loss"])
    meta = read_meta(ckpt / "4")  # what a restart resumes from: the counters and the data position
    assert meta["batch_count"] == 4 and meta["num_consumed_tokens"] == consumed and meta["data_state"] is not None


def test_trainer_builder_starts_from_a_concrete_models_weights(tiny_config, tmp_path):
    import jax
    from flax import nnx

    import internevo_jax as ie

    from .conftest import random_tiny_model

    cfg = tiny_config("data.total_steps=1", f"run_folder='{tmp_path}'", "parallel.zero1.fsdp=True")
    model, params = random_tiny_model(cfg, seed=11)
    trainer = ie.TrainerBuilder(model, None, None, config=cfg)
    state, _ = trainer.initial_state()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(params))
    assert state.params["tok_embeddings"].sharding.spec != jax.sharding.PartitionSpec()  # FSDP-sharded
    # An abstract model must be the one model_type builds: its weights come from that builder.
    other = nnx.eval_shape(lambda: ie.build_model(cfg.model_type, tiny_config("model.num_layers=3").model, nnx.Rngs(0)))
    with pytest.raises(ie.ConfigError, match="abstract model given is not the one model_type='INTERNLM2_PUBLIC'"):
        ie.TrainerBuilder(other, None, None, config=cfg)


def test_a_loader_built_for_another_mesh_is_refused(tiny_config, tmp_path):
    import jax

    import internevo_jax as ie

    cfg = tiny_config(f"run_folder='{tmp_path}'")
    train_dl, types = ie.build_train_loader_with_data_type(cfg, ie.make_mesh(cfg.parallel, jax.devices()[:4]))
    with pytest.raises(ie.ConfigError, match=r"train_dl feeds data-parallel rows 0..3, but .* size 8 .* rows 0..7"):
        ie.TrainerBuilder(None, train_dl, None, config=cfg, dataset_types=types)


def test_run_builds_one_mesh_and_the_trainer_writes_nothing_until_open_run(tiny_config, tmp_path, monkeypatch):
    """``train.run`` (what ``internevo-train`` calls): the mesh is built once and shared by the loaders and the
    trainer; constructing the Trainer writes no run folder and takes no checkpoint folder; the run trains to the end
    with its validation set."""
    from internevo_jax import mesh as mesh_lib
    from internevo_jax import train

    from .test_tokenized import write_bin

    rng = np.random.default_rng(0)
    write_bin(tmp_path / "valid" / "a" / "v.bin", [rng.integers(1, 200, size=60) for _ in range(8)])
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    cfg = tiny_config(
        "data.total_steps=3",
        "data.valid_every=3",
        f"data.valid_folder='{tmp_path / 'valid'}'",
        "parallel.tensor.size=2",  # dp 4: the set's 8 rows are 2 per rank
        f"run_folder='{run}'",
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='local:{ckpt}'",
        "ckpt.checkpoint_every=3",
    )
    meshes, opened = [], []
    make_mesh = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh", lambda *a, **k: meshes.append(make_mesh(*a, **k)) or meshes[-1])
    open_run = train.Trainer.open_run

    def open_and_look(trainer):
        opened.append((run.exists(), ckpt.exists()))  # what the constructor left on disk
        open_run(trainer)

    monkeypatch.setattr(train.Trainer, "open_run", open_and_look)
    summary = train.run(cfg)
    assert len(meshes) == 1
    assert opened[0] == (False, False)
    assert summary["finished"] and summary["steps"] == 3 and summary["valid_seconds"] > 0
    assert (run / "config.json").is_file() and (ckpt / "3").is_dir()
