"""InternEvo keys that would change the model or the run but are not implemented: the default loads, any other
value is a ConfigError naming the key, the value, what is supported and where it came from (#19)."""

import pytest

from internevo_jax import config as config_lib
from internevo_jax.config import ConfigError

from .conftest import ROOT

TINY = ROOT / "configs" / "tiny.py"

REFUSED = [
    ("model.use_swiglu", "False", "model.use_swiglu=True", "only the SwiGLU MLP"),
    ("model.is_reward", "True", "model.is_reward=False", "reward models are not implemented"),
    ("lr_scheduler.last_epoch", "10", "lr_scheduler.last_epoch=-1", "from its checkpoint"),
    ("beta2_scheduler.cur_iter", "7", "beta2_scheduler.cur_iter=-1", "from its checkpoint"),
]


@pytest.mark.parametrize(("key", "value", "supported", "fix"), REFUSED)
def test_a_non_default_value_of_an_unimplemented_key_is_refused(key, value, supported, fix):
    with pytest.raises(ConfigError) as err:
        config_lib.load(TINY, [f"--config.{key}={value}"])
    message = str(err.value)
    assert message.startswith(f"--config.{key}={value}: ")  # where the value came from
    assert f"{key}={value} is not implemented (supported: {supported};" in message
    assert fix in message


# InternEvo style, every refused key written out at its InternEvo default (as InternEvo's configs write them).
DEFAULTS_WRITTEN_OUT = """
model_type = "INTERNLM2_PUBLIC"
data = dict(seq_len=32, micro_bsz=2, total_steps=4, num_dummy_samples=100)
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, mlp_ratio=2,
             use_swiglu=True, is_reward=False)
lr_scheduler = dict(total_steps=data["total_steps"], last_epoch=-1)
beta2_scheduler = dict(cur_iter=-1)
ckpt = dict(enable_save_ckpt=False)
"""


def test_the_internevo_defaults_written_out_load(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(DEFAULTS_WRITTEN_OUT)
    cfg = config_lib.load(path)
    assert (cfg.model.use_swiglu, cfg.model.is_reward) == (True, False)
    assert (cfg.lr_scheduler.last_epoch, cfg.beta2_scheduler.cur_iter) == (-1, -1)


def test_a_file_value_names_the_file(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(DEFAULTS_WRITTEN_OUT.replace("is_reward=False", "is_reward=True"))
    with pytest.raises(ConfigError, match=rf"^{path}: model.is_reward=True is not implemented"):
        config_lib.load(path)
