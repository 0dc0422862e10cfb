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


SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


def test_every_shipped_config_is_tested():
    assert len(SHIPPED) >= 10 and {"demo.py", "tiny.py", "7b_sft.py"} <= set(SHIPPED)
    assert [f"{n}.py" for n in config_lib.shipped_config_names()] == SHIPPED  # what --config=NAME offers


@pytest.mark.parametrize("name", SHIPPED)
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


# ---------------------------------------------------------------------------------------------------------------------
# InternEvo's `_base_` style: `with read_base(): from configs._base_.models.x import *`, in the file's own tree.

BASE_MODEL = """
model_type = "INTERNLM2_PUBLIC"
HIDDEN_SIZE = {hidden}
model = dict(hidden_size=HIDDEN_SIZE, num_layers=2, num_attention_heads=4, vocab_size=256, mlp_ratio=2)
"""

USES_BASE = """
from internlm.utils.utils import read_base

with read_base():
    from configs._base_.models.small import *  # noqa: F403

data = dict(seq_len=16, micro_bsz=1)
ckpt = dict(enable_save_ckpt=False)
"""


def put(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def base_tree(root, hidden=64, top=USES_BASE):
    """``root/configs/_base_/models/small.py`` and ``root/configs/top.py`` (InternEvo's layout, no __init__ files)."""
    put(root / "configs" / "_base_" / "models" / "small.py", BASE_MODEL.format(hidden=hidden))
    return put(root / "configs" / "top.py", top)


def test_read_base_imports_resolve_in_the_files_own_tree_and_leave_no_trace(tmp_path):
    import importlib
    import sys

    modules, meta_path, path = set(sys.modules), list(sys.meta_path), list(sys.path)
    importers = set(sys.path_importer_cache)
    a, b = base_tree(tmp_path / "a", hidden=64), base_tree(tmp_path / "b", hidden=128)
    cfg_a, cfg_b = config_lib.load(a), config_lib.load(b)
    assert cfg_a.model_type == "INTERNLM2_PUBLIC" and cfg_a.model.hidden_size == cfg_a.HIDDEN_SIZE == 64
    assert cfg_b.model.hidden_size == 128  # the same module name, each file's own tree
    assert cfg_a.data.seq_len == 16 and cfg_a.model.num_layers == 2
    # Nothing stays behind: no fake internlm, no configs package, no finder, no path entry, no bytecode files.
    assert not [m for m in set(sys.modules) - modules if m.split(".")[0] in ("internlm", "configs")]
    assert sys.meta_path == meta_path and sys.path == path and set(sys.path_importer_cache) <= importers
    assert not list(tmp_path.rglob("__pycache__"))
    with pytest.raises(ImportError):
        importlib.import_module("internlm.utils.utils")
    # An edited base file is read afresh by the next load (modules are not cached across loads).
    put(tmp_path / "a" / "configs" / "_base_" / "models" / "small.py", BASE_MODEL.format(hidden=96))
    assert config_lib.load(a).model.hidden_size == 96


def test_read_base_is_ours_too_and_a_file_beside_the_configs_folder_finds_it(tmp_path):
    from internevo_jax.config import read_base

    with read_base():  # a no-op marker, as InternEvo's
        pass
    base_tree(tmp_path)
    beside = put(tmp_path / "beside.py", USES_BASE.replace("internlm.utils.utils", "internevo_jax.config"))
    assert config_lib.load(beside).model.hidden_size == 64
    assert config_lib.base_roots(tmp_path / "configs" / "x" / "deep.py") == [tmp_path, tmp_path / "configs" / "x"]


def test_modules_imported_before_a_load_are_put_back(tmp_path, monkeypatch):
    import sys
    import types

    real = {name: types.ModuleType(name) for name in ("internlm", "configs", "configs.other")}
    for name, module in real.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert config_lib.load(base_tree(tmp_path)).model.hidden_size == 64  # the shim and the file's tree win inside
    assert all(sys.modules[name] is module for name, module in real.items())
    assert "internlm.utils" not in sys.modules and "configs._base_" not in sys.modules


def test_a_missing_base_says_where_it_looked(tmp_path):
    top = base_tree(tmp_path, top=USES_BASE.replace("models.small", "models.internlm2_7B"))
    where = f"No module named 'configs._base_.models.internlm2_7B'; `configs.` imports are looked up in {tmp_path}/"
    with pytest.raises(ConfigError, match=where):
        config_lib.load(top)
    other = write(tmp_path, "from internlm.core.context import Config\ndata = dict(seq_len=8, micro_bsz=1)\n", "o.py")
    with pytest.raises(ConfigError, match=r"only `internlm.utils.utils.read_base` is provided"):
        config_lib.load(other)


def test_an_mmengine_base_list_is_named_in_a_warning(tmp_path, logs):
    path = write(tmp_path, INTERNEVO_STYLE + "_base_ = ['../_base_/models/internlm2_7B.py']\n")
    cfg = config_lib.load(path)
    assert cfg.model.hidden_size == 128  # the list itself is ignored
    warnings = [r.getMessage() for r in logs if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert "_base_ = ['../_base_/models/internlm2_7B.py']" in warnings[0] and "with read_base():" in warnings[0]


def test_load_ckpt_info_wins_over_the_legacy_keys_and_path_none_loads_nothing(tmp_path, logs):
    path = write(tmp_path, INTERNEVO_STYLE)
    info = "--config.ckpt.load_ckpt_info=dict(path='local:/w', content=('model',), ckpt_type='internevo')"
    cfg = config_lib.load(path, [info, "--config.ckpt.load_ckpt_folder='local:/legacy'"])
    assert cfg.ckpt.load_ckpt_info.path == "local:/w" and cfg.ckpt.load_ckpt_info.content == ("model",)
    warnings = [r.getMessage() for r in logs if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "ckpt.load_ckpt_info is set, so the legacy ckpt.load_ckpt_folder='local:/legacy' is ignored" in warnings[0]
    none = "--config.ckpt.load_ckpt_info=dict(path=None, content=('model',), ckpt_type='internevo')"
    assert config_lib.load(path, [none]).ckpt.load_ckpt_info is None
    assert config_lib.load(path, [none, "--config.ckpt.load_model_only_folder='/m'"]).ckpt.load_ckpt_info is None
    # A given load_ckpt_info=None (file or command line) means nothing to load: the legacy keys are ignored too.
    cfg = config_lib.load(path, ["--config.ckpt.load_ckpt_info=None", "--config.ckpt.load_ckpt_folder='/legacy'"])
    assert cfg.ckpt.load_ckpt_info is None and cfg.ckpt.load_ckpt_folder is None
    text = INTERNEVO_STYLE.replace("ckpt = dict(", "ckpt = dict(load_ckpt_info=None, load_ckpt_folder='/legacy', ")
    assert config_lib.load(write(tmp_path, text, "both.py")).ckpt.load_ckpt_info is None
    warnings = [r.getMessage() for r in logs if r.levelname == "WARNING"]
    assert len(warnings) == 4 and all("(nothing to load)" in w for w in warnings[1:])
    assert "set to None (nothing to load)" in warnings[2] and "(InternEvo would load it)" in warnings[2]
    # Without load_ckpt_info the legacy key is read (and the resolved config names what is loaded in one place).
    cfg = config_lib.load(path, ["--config.ckpt.load_ckpt_folder='local:/legacy'"])
    assert cfg.ckpt.load_ckpt_info.path == "local:/legacy" and cfg.ckpt.load_ckpt_folder is None
    assert len([r for r in logs if r.levelname == "WARNING"]) == 4
    with pytest.raises(ConfigError, match="set one of ckpt.load_ckpt_folder"):
        config_lib.load(path, ["--config.ckpt.load_ckpt_folder='/a'", "--config.ckpt.load_model_only_folder='/b'"])
    with pytest.raises(ConfigError, match="needs path="):
        config_lib.load(path, ["--config.ckpt.load_ckpt_info=dict(content=('model',))"])


def test_qwen2_moe_is_refused_naming_the_moe_types_we_have(tmp_path):
    with pytest.raises(ConfigError, match=r"model_type='QWEN2MOE': this mixture-of-experts \(MoE\) family is not"):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.model_type=QWEN2MOE"])


@pytest.mark.parametrize("model_type, biases", [("INTERNLM_MoE", True), ("MIXTRALMOE", False)])
def test_moe_model_types_load_with_their_family_defaults(tmp_path, model_type, biases):
    cfg = config_lib.load(
        write(tmp_path, INTERNEVO_STYLE), [f"--config.model_type={model_type}", "--config.model.num_experts=4"]
    )
    assert cfg.model.no_bias is not biases and cfg.model.moe.to_dict() == cfg.moe.to_dict()
    assert cfg.moe.top_k == 1 and cfg.moe.min_capacity == 4 and cfg.model.moe_type == "GShard"  # InternEvo's


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model_type=INTERNLM", r"model.num_experts=4 needs a mixture-of-experts model_type"),
        ("--config.moe.top_k=3", r"moe.top_k must be in \[1, 2\], got 3"),
        ("--config.moe.noisy_gate_policy='Gauss'", r"moe.noisy_gate_policy='Gauss' is unknown"),
        ("--config.model.moe_type='MegaBlock'", r"model.moe_type='MegaBlock' is not implemented"),
    ],
)
def test_moe_settings_we_cannot_run_are_refused(tmp_path, override, message):
    base = ["--config.model_type=INTERNLM_MoE", "--config.model.num_experts=4"]
    with pytest.raises(ConfigError, match=message):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), base + [override])


# ---------------------------------------------------------------------------------------------------------------------
# The command line as ml_collections' config flags take it (issue 18).


def test_space_separated_values_and_absl_booleans_are_accepted(tmp_path):
    from internevo_jax.initialize import parse_args

    path = write(tmp_path, INTERNEVO_STYLE)
    argv = [f"--config={path}", "--config.model.num_layers", "3", "--config.adam.lr", "-1e-3", "--launcher=local"]
    argv += ["--config.ckpt.auto_resume", "FALSE", "--config.enable_tb=false", "--config.model.norm_head"]
    argv += ["--noconfig.use_fp32_norm", "--config.JOB_NAME", "spaced"]
    args = parse_args(argv=argv)
    assert args.launcher == "local" and args.config == str(path)
    assert args.overrides == [
        "--config.model.num_layers=3",
        "--config.adam.lr=-1e-3",
        "--config.ckpt.auto_resume=FALSE",
        "--config.enable_tb=false",
        "--config.model.norm_head",
        "--noconfig.use_fp32_norm",
        "--config.JOB_NAME=spaced",
    ]
    assert config_lib.parse_override("--config.ckpt.auto_resume=True") == ("ckpt.auto_resume", True)
    assert config_lib.parse_override("--config.ckpt.auto_resume=tRuE") == ("ckpt.auto_resume", True)
    ok = [o for o in args.overrides if "adam.lr" not in o]  # a negative lr is refused since issue 18
    cfg = config_lib.load(path, ok)
    assert cfg.model.num_layers == 3 and cfg.JOB_NAME == "spaced"
    assert cfg.ckpt.auto_resume is False and cfg.enable_tb is False
    assert cfg.model.norm_head is True and cfg.use_fp32_norm is False


def test_a_bare_flag_needs_a_bool_key(tmp_path):
    with pytest.raises(ConfigError, match=r"--config.model.num_layers: no value given.*--config.model.num_layers V"):
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), ["--config.model.num_layers"])


def test_print_config_is_parsed():
    from internevo_jax.initialize import parse_args

    assert parse_args(argv=["--config=x.py", "--print_config"]).print_config is True
    assert parse_args(argv=["--config=x.py"]).print_config is False


# ---------------------------------------------------------------------------------------------------------------------
# Ranges, and errors that name the override that caused them (issue 18).


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hidden_size=0", "model.hidden_size must be >= 1, got 0"),
        ("model.num_layers=0", "model.num_layers must be >= 1, got 0"),
        ("model.num_attention_heads=0", "model.num_attention_heads must be >= 1, got 0"),
        ("model.num_kv_attention_heads=-2", "model.num_kv_attention_heads must be >= 1, got -2"),
        ("model.vocab_size=0", "model.vocab_size must be >= 1, got 0"),
        ("model.mlp_ratio=-1", "model.mlp_ratio must be > 0, got -1"),
        ("model.mlp_ratio=0.001", "model.mlp_ratio 0.001 gives a feed-forward width of 0"),
        ("model.layer_norm_epsilon=0", "model.layer_norm_epsilon must be > 0"),
        ("adam.lr=-1", "adam.lr must be >= 0, got -1.0"),
        ("adam.lr=inf", "adam.lr must be >= 0 and finite, got inf"),
        ("adam.adam_beta1=1", "adam.adam_beta1 must be in [0, 1), got 1.0"),
        ("adam.adam_beta2=-0.1", "adam.adam_beta2 must be in [0, 1), got -0.1"),
        ("adam.adam_eps=0", "adam.adam_eps must be > 0, got 0.0"),
        ("adam.weight_decay=-0.01", "adam.weight_decay must be >= 0"),
        ("lr_scheduler.warmup_ratio=1.5", "lr_scheduler.warmup_ratio must be in [0, 1], got 1.5"),
        ("lr_scheduler.eta_min=-1", "lr_scheduler.eta_min must be >= 0"),
        ("data.seq_len=-4", "data.seq_len must be"),
        ("data.micro_bsz=0", "data.micro_bsz must be"),
        ("data.micro_num=0", "data.micro_num must be >= 1, got 0"),
        ("data.total_steps=-1", "data.total_steps must be >= 1, got -1"),
        ("data.seed=-1", "data.seed must be in [0, 4294967296)"),
        ("hybrid_zero_optimizer.clip_grad_norm=-1", "hybrid_zero_optimizer.clip_grad_norm must be >= 0"),
        ("model.drop_rate=-0.1", "model.drop_rate must be in [0, 1)"),
        ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1)"),
        ("grad_scaler.backoff_factor=1", "grad_scaler.backoff_factor must be in (0, 1)"),
        ("grad_scaler.growth_factor=1", "grad_scaler.growth_factor must be > 1"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_override(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), [f"--config.{override}"])
    msg = str(e.value)
    assert message in msg
    key = override.split("=")[0]
    assert msg.startswith(f"--config.{key}="), msg  # the override, not the config file
    assert "cfg.py" not in msg


def test_range_errors_name_the_file_when_the_file_set_the_value(tmp_path):
    path = write(tmp_path, INTERNEVO_STYLE.replace("num_layers=2", "num_layers=0"))
    with pytest.raises(ConfigError, match=rf"^{path}: model.num_layers must be >= 1, got 0"):
        config_lib.load(path)


def test_cross_field_errors_name_the_overrides_involved(tmp_path):
    path = write(tmp_path, INTERNEVO_STYLE)
    with pytest.raises(ConfigError, match=r"^--config.model.num_attention_heads=5: model.hidden_size 128 is not div"):
        config_lib.load(path, ["--config.model.num_attention_heads=5"])
    with pytest.raises(ConfigError, match=r"^--config.model=\{'num_layers': 0\}: model.num_layers must be >= 1"):
        config_lib.load(path, ["--config.model=dict(num_layers=0)"])
    # A derived key follows its source: the source's override is named.
    with pytest.raises(ConfigError, match=r"^--config.data.total_steps=0: data.total_steps must be >= 1"):
        config_lib.load(path, ["--config.data.total_steps=0"])
    with pytest.raises(ConfigError, match=r"^--config.JOB_NAME='a/b': JOB_NAME='a/b' must be a non-empty name"):
        config_lib.load(path, ["--config.JOB_NAME=a/b"])
    with pytest.raises(ConfigError, match=r"^--config.data.skip_batches='5-1': data.skip_batches="):
        config_lib.load(path, ["--config.data.skip_batches=5-1"])


@pytest.mark.parametrize("value", ["-" * 5000 + "1", "[" * 5000 + "]" * 5000, "not " * 3000 + "1", "1+" * 9000 + "1"])
def test_a_deeply_nested_value_is_a_config_error(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        config_lib.load(write(tmp_path, INTERNEVO_STYLE), [f"--config.model.num_layers={value}"])
    msg = str(e.value)
    assert msg.startswith("--config.model.num_layers") and len(msg) < 400, msg


def test_dummy_data_beyond_the_vocabulary_is_refused_before_anything_compiles(tmp_path):
    """Checked where the dummy data is built (before the step compiles), not at config load: a saved config with a
    small vocabulary must still load to convert or serve its checkpoint."""
    from internevo_jax.data import loader

    path = write(tmp_path, INTERNEVO_STYLE)
    cfg = config_lib.load(path, ["--config.model.vocab_size=128"])
    with pytest.raises(ConfigError) as e:
        loader.build_train_loader(cfg.data, 1, range(1), cfg.model.vocab_size)
    msg = str(e.value)
    assert msg.startswith("dummy data (data.train_folder=None) holds token ids up to 199")
    assert "set model.vocab_size >= 200" in msg
    cfg = config_lib.load(path, ["--config.model.vocab_size=200"])
    assert loader.build_train_loader(cfg.data, 1, range(1), cfg.model.vocab_size) is not None


def test_a_rampup_that_does_not_land_on_micro_num_is_refused_with_pipelines(tiny_config):
    """InternEvo asserts (micro_num - start) % incr == 0 under pipeline parallelism (pipeline.check_config)."""
    pipe = ("model.num_layers=4", "parallel.pipeline.size=2")
    with pytest.raises(ConfigError) as e:
        tiny_config(*pipe, "data.micro_num=8", "data.rampup_batch_size='1 2 3'")
    msg = str(e.value)
    assert msg.startswith("--config.data.rampup_batch_size='1 2 3'")  # the override that set it, named
    assert "the increment 2 must divide data.micro_num - start = 8 - 1 = 7 (remainder 1)" in msg
    assert tiny_config(*pipe, "data.micro_num=7", "data.rampup_batch_size='1 2 3'").data.micro_num == 7
    tiny_config("data.micro_num=8", "data.rampup_batch_size='1 2 3'")  # without pipelines: allowed, as InternEvo
