"""Config loading: both file styles, overrides, derived defaults, and the errors users see."""

import math
import textwrap

import pytest

from internevo_jax import config as config_lib
from internevo_jax.config import ConfigError

from .conftest import ROOT

INTERNEVO_STYLE = """
JOB_NAME = "style_test"
model_type = "INTERNLM2_PUBLIC"
SEQ_LEN = 64
HIDDEN_SIZE = 128
data = dict(seq_len=SEQ_LEN, micro_bsz=2, micro_num=3, total_steps=100)
model = dict(hidden_size=HIDDEN_SIZE, num_layers=2, num_attention_heads=4, vocab_size=512, mlp_ratio=2,
             dtype="torch.bfloat16", checkpoint=True)
adam = dict(lr=2e-4, adam_beta2=0.99)
lr_scheduler = dict(total_steps=data["total_steps"], warmup_ratio=0.05)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=0)
parallel = dict(zero1=8, tensor=1, pipeline=dict(size=1))
ckpt = dict(enable_save_ckpt=False)
"""


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_internevo_style_file_equals_get_config_file(tmp_path):
    a = config_lib.load(write(tmp_path, INTERNEVO_STYLE))
    wrapped = (
        "def get_config():\n" + textwrap.indent(INTERNEVO_STYLE, "    ") + "\n    return {k: v for k, v in "
        "locals().items()}\n"
    )
    b = config_lib.load(write(tmp_path, wrapped, "cfg2.py"))
    assert a.to_dict() == b.to_dict()
    assert a.SEQ_LEN == 64 and a.data.seq_len == 64  # helper variables are kept, as InternEvo does
    assert a.parallel.zero1.size == 8 and a.parallel.tensor.mode == "mtp"  # int shorthands normalised
    assert a.model.checkpoint == 1.0 and a.model.num_kv_attention_heads == 4
    assert a.data.packed_length == 128 and a.data.valid_micro_num == 3


def test_defaults_match_internevo(tmp_path):
    cfg = config_lib.load(write(tmp_path, "data = dict(seq_len=8, micro_bsz=1)\nckpt = dict(enable_save_ckpt=False)\n"))
    assert cfg.model_type == "INTERNLM" and cfg.JOB_NAME == "AnonymousJob"
    assert (cfg.adam.lr, cfg.adam.adam_beta2, cfg.adam.weight_decay) == (1e-4, 0.95, 0.01)
    assert cfg.lr_scheduler.total_steps == cfg.data.total_steps == 50000
    assert (cfg.lr_scheduler.warmup_ratio, cfg.lr_scheduler.eta_min) == (0.01, 1e-5)
    assert cfg.beta2_scheduler.init_beta2 == 0.95 and cfg.beta2_scheduler.c == 0
    assert cfg.grad_scaler.fp16.initial_scale == 2**16 and cfg.grad_scaler.hysteresis == 2
    assert cfg.ckpt.auto_resume is True and math.isinf(cfg.ckpt.checkpoint_every)
    assert cfg.model.dtype == "torch.float16" and cfg.data.seed == 1024
    assert not cfg.model.no_bias  # InternLM1 has biases
    assert cfg.model.embedding_init_std == 0.0052 and cfg.model.attn_wqkv_init_std == 0.006


def test_overrides_apply_and_derived_keys_follow(tmp_path):
    path = write(tmp_path, INTERNEVO_STYLE)
    cfg = config_lib.load(
        path,
        [
            "--config.data.total_steps=5",
            "--config.model.num_layers=3",
            "--config.data.micro_num=2",
            "--config.adam.adam_beta2=0.9",
            "--config.model.dtype=torch.float32",
        ],
    )
    assert cfg.data.total_steps == 5 and cfg.model.num_layers == 3
    # 7B_sft-style files write total_steps=data["total_steps"]: that ties it to its source.
    assert cfg.lr_scheduler.total_steps == 5
    assert cfg.data.valid_micro_num == 2 and cfg.data.gradient_accumulation == 2
    assert cfg.beta2_scheduler.init_beta2 == 0.9
    assert cfg.model.dtype == "torch.float32"


def test_explicit_derived_value_is_kept(tmp_path):
    text = INTERNEVO_STYLE.replace('total_steps=data["total_steps"]', "total_steps=70")
    cfg = config_lib.load(write(tmp_path, text), ["--config.data.total_steps=5"])
    assert cfg.lr_scheduler.total_steps == 70
    cfg = config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.lr_scheduler.total_steps=9"])
    assert cfg.lr_scheduler.total_steps == 9 and cfg.data.total_steps == 100


def test_misspelt_override_names_closest_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.data.micro_bzs=2"])
    msg = str(e.value)
    assert "data.micro_bzs" in msg and "data.micro_bsz" in msg and "--config.data.micro_bzs" in msg


def test_misspelt_section_and_file_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean: model"):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.modle.num_layers=2"])
    bad = INTERNEVO_STYLE.replace("num_layers=2", "num_layer=2")
    with pytest.raises(ConfigError, match="model.num_layer'.*did you mean: model.num_layers"):
        config_lib.load(write(tmp_path, bad))


def test_wrong_type_names_field_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"data.micro_bsz expects int.*got str 'abc'"):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.data.micro_bsz=abc"])
    with pytest.raises(ConfigError, match=r"ckpt.auto_resume expects bool"):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.ckpt.auto_resume=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_attention_heads=5", "not divisible by model.num_attention_heads 5"),
        ("model_type='GPT'", "model_type='GPT' is unknown"),
        ("model.dtype=torch.int8", "model.dtype='torch.int8' is unknown"),
        ("parallel.tensor.mode=xsp", "parallel.tensor.mode='xsp' is unknown"),
        ("data.seq_len=None", "data.seq_len is required"),
        ("ckpt.enable_save_ckpt=True", "needs ckpt.save_ckpt_folder"),
        ("model.checkpoint=1.5", "model.checkpoint must be"),
        ("model.drop_rate=1.0", "model.drop_rate must be in"),
        ("model.attn_impl=cudnn model.attn_drop_rate=0.1", "model.attn_drop_rate > 0 needs model.attn_impl='xla'"),
    ],
)
def test_cross_field_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), [f"--config.{o}" for o in override.split()])


def test_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="failed to execute: NameError"):
        config_lib.load(write(tmp_path, "data = dict(seq_len=UNDEFINED)\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "missing.py")


@pytest.mark.parametrize("name", ["demo.py", "tiny.py", "7b_sft.py"])
def test_shipped_configs_load(name):
    cfg = config_lib.load(ROOT / "configs" / name)
    assert cfg.data.seq_len > 0
    if name == "7b_sft.py":
        assert cfg.model_type == "INTERNLM" and cfg.model.hidden_size == 4096 and cfg.model.num_layers == 32
        assert config_lib.ffn_width(4096, 8 / 3) == 11008 and cfg.model.vocab_size == 103168
        assert cfg.lr_scheduler.total_steps == 50000 and cfg.data.packed_length == 4096


def test_resolved_config_is_json(tmp_path):
    import json

    cfg = config_lib.load(write(tmp_path, INTERNEVO_STYLE))
    data = json.loads(config_lib.to_json(cfg))
    assert data["ckpt"]["checkpoint_every"] == "inf" and data["data"]["seq_len"] == 64


@pytest.mark.parametrize(
    "model_type, overrides, interleaved",
    [
        ("LLAMA2", [], True),  # InternEvo's LLAMA2 builder default adapt_hf=False: Meta layout
        ("INTERNLM2_PUBLIC", [], False),
        ("INTERNLM2_PUBLIC", ["model.adapt_hf=False"], True),
        ("LLAMA2", ["model.qk_interleaved=False"], False),
        ("INTERNLM", ["model.adapt_hf=False"], False),  # InternLM1 has no such switch; InternEvo ignores it
    ],
)
def test_rope_layout_follows_adapt_hf_and_model_type(tmp_path, model_type, overrides, interleaved):
    cfg = config_lib.load(
        write(tmp_path, INTERNEVO_STYLE), [f"--config.model_type={model_type}"] + [f"--config.{o}" for o in overrides]
    )
    assert cfg.model.qk_interleaved is interleaved and cfg.model.adapt_hf is (not interleaved)


def test_contradicting_rope_switches_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="INTERNLM has only the half-split RoPE layout"):
        config_lib.load(
            write(tmp_path, INTERNEVO_STYLE), ["--config.model_type=INTERNLM", "--config.model.qk_interleaved=True"]
        )
    with pytest.raises(ConfigError, match="contradict"):
        config_lib.load(
            write(tmp_path, INTERNEVO_STYLE),
            ["--config.model_type=LLAMA2", "--config.model.adapt_hf=True", "--config.model.qk_interleaved=True"],
        )


def test_skip_batches_spans():
    assert config_lib.parse_skip_batches("0-3, 7,9-9") == [(0, 3), (7, 7), (9, 9)]
    skip = config_lib.batch_skipper("2-3,5")
    assert [b for b in range(7) if skip(b)] == [2, 3, 5]
    for bad in ("3-1", "1-4,2", "a", "1-"):
        with pytest.raises(ConfigError, match="data.skip_batches"):
            config_lib.parse_skip_batches(bad)
