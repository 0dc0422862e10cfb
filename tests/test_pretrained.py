"""Starting a run from a Hugging Face folder (ckpt.load_ckpt_info with ckpt_type='hf'), and resuming past it; the RoPE
scaling of its config.json, read or refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internevo_jax import Trainer
from internevo_jax.checkpoint import start
from internevo_jax.config import ConfigError
from internevo_jax.convert import hf_config, hf_layout
from internevo_jax.convert import hf_folder as hf_folder_lib
from internevo_jax.errors import CheckpointError
from internevo_jax.model import build_model


def hf_folder(cfg, path, seed=5):
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(seed))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    return hf_layout.save_hf(params, cfg.model, path, dtype="bfloat16"), params


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


def test_weights_of_another_layout_are_a_config_error_naming_the_folder(tiny_config, tmp_path, monkeypatch):
    """A reader's tree that does not match the model's params is refused with the folder and model_type named (found
    by mypy: the message indexed the start plan like a dict, so this raised a TypeError instead)."""
    base = tiny_config("model_type='LLAMA2'")
    folder, params = hf_folder(base, tmp_path / "hf")
    short = {k: v for k, v in params.items() if k != "norm"}  # one top-level entry missing
    assert len(short) == len(params) - 1
    monkeypatch.setitem(start.FOREIGN, "hf", ("Hugging Face folder", lambda path, model: short))
    info = f"ckpt.load_ckpt_info=dict(path='{folder}', content=('model',), ckpt_type='hf')"
    trainer = Trainer(tiny_config("model_type='LLAMA2'", info, f"run_folder='{tmp_path}/run'"))
    with pytest.raises(ConfigError, match=f"{folder}: the weights do not fit model_type=LLAMA2"):
        trainer.initial_state()


def test_missing_hf_folder_names_it(tiny_config, tmp_path):
    cfg = tiny_config(f"ckpt.load_ckpt_info=dict(path='{tmp_path}/nope', content=('model',), ckpt_type='hf')")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/nope: no config.json"):
        Trainer(cfg)  # before compiling anything


# ---------------------------------------------------------------------------------------------------------------------
# RoPE scaling in config.json: read exactly, or refused with the reason (never read as plain RoPE)


def llama_config(**extra):
    """A tiny Llama config.json, as transformers 4 or 5 writes it."""
    return dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


def rope_values(hf):
    _, values = hf_config.model_overrides(hf)
    keys = ("use_dynamic_ntk_rope", "rope_scaling_type", "rope_scaling_factor", "rope_low_freq_factor")
    return tuple(values[k] for k in keys + ("rope_high_freq_factor", "rope_original_max_position_embeddings"))


def test_rope_scaling_is_read_from_every_place_transformers_writes_it():
    plain = (False, None, 1.0, 1.0, 4.0, None)
    assert rope_values(llama_config()) == plain
    assert rope_values(llama_config(rope_scaling=None, rope_parameters=dict(rope_type="default"))) == plain
    linear = (False, "linear", 2.0, 1.0, 4.0, None)
    assert rope_values(llama_config(rope_scaling=dict(type="linear", factor=2.0))) == linear  # transformers < 4.43
    assert rope_values(llama_config(rope_parameters=dict(rope_type="linear", factor=2, rope_theta=1e4))) == linear
    # llama3: the top-level original length first (as transformers), then the scaling's, then max_position_embeddings
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    want = (False, "llama3", 8.0, 1.0, 4.0, 32)
    assert rope_values(llama_config(rope_scaling=dict(llama3, original_max_position_embeddings=32))) == want
    assert rope_values(llama_config(original_max_position_embeddings=32, rope_parameters=llama3)) == want
    assert rope_values(llama_config(rope_scaling=llama3))[-1] == 64
    assert rope_values(llama_config(rope_scaling=dict(type="dynamic", factor=2.0)))[:3] == (True, None, 2.0)


@pytest.mark.parametrize(
    "scaling, reason",
    [
        (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32), "'yarn' is not implemented .YaRN"),
        (
            dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8),
            "'longrope' is not implemented .LongRoPE",
        ),
        (dict(rope_type="proportional", factor=2.0), "'proportional' is not implemented .its frequencies"),
        (dict(rope_type="llama3", factor=8.0), "'llama3' RoPE scaling has no number 'low_freq_factor'"),
        (dict(rope_type="linear"), "'linear' RoPE scaling has no number 'factor'"),
    ],
)
def test_other_rope_scalings_are_refused_with_the_reason(tiny_config, tmp_path, scaling, reason):
    base = tiny_config("model_type='LLAMA2'")
    folder, _ = hf_folder(base, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, rope_scaling=scaling)))
    with pytest.raises(ConfigError, match=reason):
        hf_folder_lib.load_hf(folder, base.model)
    info = f"ckpt.load_ckpt_info=dict(path='{folder}', content=('model',), ckpt_type='hf')"
    with pytest.raises(ConfigError, match=reason):
        Trainer(tiny_config("model_type='LLAMA2'", info, f"run_folder='{tmp_path}/run'"))  # before compiling


def test_rope_scaling_keys_are_checked(tiny_config):
    cfg = tiny_config("model.rope_scaling_type='llama3'")
    assert cfg.model.rope_original_max_position_embeddings is None  # max_position_embeddings then
    for overrides, message in [
        (("model.rope_scaling_type='yarn'",), r"rope_scaling_type='yarn' is not implemented; valid: None"),
        (("model.rope_scaling_type='dynamic'",), r"dynamic NTK with model.use_dynamic_ntk_rope=True"),
        (
            ("model.rope_scaling_type='linear'", "model.use_dynamic_ntk_rope=True"),
            r"are two RoPE scalings; set one",
        ),
        (("model.rope_low_freq_factor=4.0",), r"need 0 < low < high"),
        (("model.rope_original_max_position_embeddings=0",), r"None or an int >= 1, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(*overrides)
