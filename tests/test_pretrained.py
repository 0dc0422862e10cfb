"""Starting a run from a Hugging Face folder (ckpt.load_ckpt_info with ckpt_type='hf'), and resuming past it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import Trainer, convert
from internevo_jax.config import ConfigError
from internevo_jax.model import build_model


def hf_folder(cfg, path, seed=5):
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(seed))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    return convert.save_hf(params, cfg.model, path, dtype="bfloat16"), params


def test_run_starts_from_hf_weights_then_resumes_its_own_checkpoint(tiny_config, tmp_path):
    base = tiny_config("model_type='LLAMA2'")
    folder, params = hf_folder(base, tmp_path / "hf")
    info = f"ckpt.load_ckpt_info=dict(path='local:{folder}', content=('MODEL',), ckpt_type='hf')"
    overrides = (
        "model_type='LLAMA2'",
        info,
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='{tmp_path}/ckpt'",
        "ckpt.checkpoint_every=2",
        "data.total_steps=2",
        f"run_folder='{tmp_path}/run'",
    )
    cfg = tiny_config(*overrides)
    assert cfg.ckpt.load_ckpt_info.content == ("model",)
    trainer = Trainer(cfg)
    state, meta = trainer.initial_state()
    assert meta["batch_count"] == 0 and int(state.opt_state.count) == 0
    want = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16).astype(np.float32)), params)  # via the bf16 file
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), want)
    assert state.params["tok_embeddings"].sharding == trainer.shardings.params["tok_embeddings"]
    trainer.fit()

    # A restart with the same config resumes the run's own checkpoint instead of reloading the HF weights.
    again = Trainer(tiny_config(*overrides[:-2], "data.total_steps=3", f"run_folder='{tmp_path}/run2'"))
    state, meta = again.initial_state()
    assert meta["batch_count"] == 2 and int(state.opt_state.count) == 2


@pytest.mark.parametrize(
    "info, message",
    [
        ("dict(path='local:/x', content=('model', 'weights'), ckpt_type='hf')", "content has ['weights']"),
        ("dict(path='local:/x', content=('model', 'optimizer'), ckpt_type='hf')", "holds model weights only"),
        ("dict(path='local:/x', ckpt_type='safetensors')", "ckpt_type='safetensors' is unknown"),
        ("dict(content=('model',), ckpt_type='hf')", "needs path="),
    ],
)
def test_bad_load_ckpt_info_is_a_config_error(tiny_config, info, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_config(f"ckpt.load_ckpt_info={info}")


def test_missing_hf_folder_names_it(tiny_config, tmp_path):
    cfg = tiny_config(f"ckpt.load_ckpt_info=dict(path='{tmp_path}/nope', content=('model',), ckpt_type='hf')")
    with pytest.raises(ConfigError, match=f"{tmp_path}/nope: no config.json"):
        Trainer(cfg)  # before compiling anything
