"""Config files as InternEvo ships them run unchanged, apart from size overrides.

The fixtures are written here in InternEvo's style (v0.3.4: ``configs/demo.py`` with its ``_base_`` imports,
``7B_sft.py``, ``7B_isp_sft.py``, ``7B_internlm2.py``, ``7B_llama2.py``): the same sections and keys, the same
placeholders (``local:llm_ckpts/xxxx``, both ``load_ckpt_info`` and the legacy ``load_ckpt_folder``), in an
InternEvo-like tree ``<repo>/configs/{_base_/..., *.py}``. Runs shrink the model and the run length from the command
line only, as a user trying them on a laptop would.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from internevo_jax import config as config_lib
from internevo_jax.checkpoint import plan
from internevo_jax.errors import CheckpointError

from .conftest import ROOT

# ---------------------------------------------------------------------------------------------------------------------
# The fixtures: an InternEvo checkout's configs folder, in miniature.


def fill(template: str, **values) -> str:
    """``<<name>>`` -> value (the templates hold f-strings and dicts, so no str.format)."""
    for name, value in values.items():
        template = template.replace(f"<<{name}>>", str(value))
    assert "<<" not in template, template
    return template


DEFAULT_RUNTIME = """
cudnn_deterministic = False
cudnn_benchmark = False
enable_tb = True

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),  # loss scale start, floor, growth period
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,  # overflows before the scale backs off
)
"""

BASE_INTERNLM2_7B = """
model_type = "INTERNLM2_PUBLIC"

VOCAB_SIZE = 92544
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 3.5
NUM_LAYER = 32

model = dict(
    num_chunks=1,
    checkpoint=0.2,  # share of the layers that recompute their activations
    dtype="torch.bfloat16",
    embed_split_hidden=True,
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    adapt_hf=False,
    apply_post_layer_norm=False,
    no_bias=True,
    layer_norm_epsilon=1e-5,
    rope_base=1000000,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=False, reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0
)

parallel = dict(
    zero1=dict(size=8),  # Adam states split over 8 data-parallel ranks
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True, memory_pool=True),
)
"""

# The sections every top-level InternEvo config repeats after its ckpt/data sections.
TRAINING = """
hybrid_zero_optimizer = dict(
    overlap_sync_grad=True, overlap_sync_param=False, reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0
)
loss = dict(label_smoothing=0)
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(
    total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1
)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)
monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
        alert_file_path=f"llm_alter/{JOB_NAME}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
use_fp32_norm = False
"""

DATA = """
TRAIN_FOLDER = None  # None: dummy data
VALID_FOLDER = None
data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,
    micro_bsz=<<micro_bsz>>,
    valid_micro_num=4,
    valid_every=<<valid_every>>,
    pack_sample_into_one=False,
    total_steps=<<total_steps>>,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)
"""

# demo.py: everything about the model from the base files; the file's own size helpers are not used by them.
DEMO = (
    """
from internlm.utils.utils import read_base

with read_base():
    from configs._base_.default_runtime import *  # noqa: F403
    from configs._base_.models.internlm2_7B import *  # noqa: F403

JOB_NAME = "7b_train"
DO_ALERT = False

SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168

SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = None  # "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_info=dict(path=LOAD_CKPT_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=False,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
"""
    + fill(DATA, micro_bsz=2, valid_every=50, total_steps=50000)
    + TRAINING
)

# 7B_sft.py / 7B_isp_sft.py: one flat file, a placeholder path in load_ckpt_info and the legacy load_ckpt_folder.
SFT = (
    """
JOB_NAME = "7b_train"
DO_ALERT = False

SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168

MODEL_ONLY_FOLDER = "local:llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_folder="local:llm_ckpts/",  # the legacy key, beside the new one
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=True,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
"""
    + fill(DATA, micro_bsz=2, valid_every=50, total_steps=50000)
    + """
grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)
"""
    + TRAINING
    + """
model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=<<tensor>>, mode="<<mode>>"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=<<weight>>, overlap=True, memory_pool=True),
)
cudnn_deterministic = False
cudnn_benchmark = False
"""
)

# 7B_internlm2.py / 7B_llama2.py: flat, GQA, auto_resume off and no load_ckpt_info at all.
GQA = (
    """
JOB_NAME = "<<job>>"
model_type = "<<model_type>>"
DO_ALERT = False

VOCAB_SIZE = <<vocab>>
SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 3.5
NUM_LAYER = 32

MODEL_ONLY_FOLDER = "local:llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    auto_resume=False,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
"""
    + fill(DATA, micro_bsz=1, valid_every=0, total_steps=20)
    + TRAINING
    + """
model = dict(
    checkpoint=False,
    num_chunks=1,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    no_bias=True,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    use_flash_attn=True,
)
parallel = dict(
    zero1=dict(size=<<zero1>>),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True, memory_pool=True),
)
cudnn_deterministic = False
cudnn_benchmark = False
"""
)

# 7B_MoE4_sft.py: InternLM1 blocks with 4 GShard top-2 experts, moe_loss_coeff 0.1, the placeholder load_ckpt_info
# and the legacy load_ckpt_folder of 7B_sft.py, and its own moe section (v0.3.4's file, keys and values).
MOE4 = (
    """
JOB_NAME = "7b_moe_train"
DO_ALERT = False

SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 4 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168

MODEL_ONLY_FOLDER = "local:llm_ckpts/xxxx"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
LOAD_CKPT_FOLDER = "local:llm_ckpts/49"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    load_ckpt_folder="local:llm_ckpts/",
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=True,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
"""
    + fill(DATA, micro_bsz=2, valid_every=50, total_steps=50000)
    + """
grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)
hybrid_zero_optimizer = dict(
    overlap_sync_grad=False, overlap_sync_param=False, reduce_bucket_size=512 * 1024 * 1024, clip_grad_norm=1.0
)
loss = dict(label_smoothing=0, moe_loss_coeff=0.1)
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(
    total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1
)
beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)
use_fp32_norm = False
model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
    num_experts=4,
    moe_use_residual=False,
    moe_type="GShard",
)
parallel = dict(
    zero1=dict(size=-1, fsdp=False),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True, memory_pool=True),
)
cudnn_deterministic = False
cudnn_benchmark = False
monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
        alert_file_path=f"llm_alter/{JOB_NAME}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
moe = dict(
    top_k=2,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    min_capacity=4,
    noisy_gate_policy=None,
    drop_tokens=True,
    use_rts=True,
)
model_type = "INTERNLM_MoE"
"""
)

FILES = {
    "_base_/default_runtime.py": DEFAULT_RUNTIME,
    "_base_/models/internlm2_7B.py": BASE_INTERNLM2_7B,
    "demo.py": DEMO,
    "7B_sft.py": fill(SFT, tensor=1, mode="mtp", weight=1),
    "7B_isp_sft.py": fill(SFT, tensor=2, mode="isp", weight=4),
    "7B_internlm2.py": fill(GQA, job="7b_internlm2_train", model_type="INTERNLM2_PUBLIC", vocab=92544, zero1=8),
    "7B_llama2.py": fill(GQA, job="7b_llama2_train", model_type="LLAMA2", vocab=32000, zero1=-1),
    "7B_MoE4_sft.py": MOE4,
}

# A laptop-sized model and run: the only changes made to the files.
SIZES = (
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=4",
    "model.vocab_size=256",
    "data.seq_len=32",
    "data.total_steps=2",
)
GQA_SIZES = SIZES + ("model.num_kv_attention_heads=2",)


@pytest.fixture
def evo(tmp_path, monkeypatch):
    """``<tmp>/InternEvo/configs/...`` as above; the working directory is ``<tmp>/work`` (relative paths such as
    ``llm_ckpts/xxxx``, ``RUN/`` and ``llm_alter/`` land there)."""
    configs = tmp_path / "InternEvo" / "configs"
    for name, text in FILES.items():
        (configs / name).parent.mkdir(parents=True, exist_ok=True)
        (configs / name).write_text(textwrap.dedent(text))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return configs


def load(path, *overrides):
    return config_lib.load(path, [f"--config.{o}" for o in overrides])


def train(cfg):
    """Trains ``cfg`` in this process (8 fake devices); returns the metrics rows."""
    from internevo_jax import Trainer

    Trainer(cfg).fit()
    runs = sorted((Path.cwd() / "RUN" / cfg.JOB_NAME).iterdir())
    rows = [json.loads(x) for x in (runs[-1] / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(cfg.data.total_steps))
    assert all(math.isfinite(r["loss"]) for r in rows)
    return rows


def warnings_of(logs):
    return [r.getMessage() for r in logs if r.levelname == "WARNING"]


# ---------------------------------------------------------------------------------------------------------------------


def test_demo_with_base_imports_loads_as_internevo_reads_it_and_trains(evo, logs):
    cfg = load(evo / "demo.py", *GQA_SIZES)
    # From the base files: model type, model section (its own size helpers), parallel and the runtime's grad scaler.
    assert cfg.model_type == "INTERNLM2_PUBLIC" and cfg.model.rope_base == 1e6 and cfg.model.checkpoint == 0.2
    assert cfg.model.qk_interleaved is True and cfg.model.no_bias is True  # adapt_hf=False in the base
    assert cfg.parallel.zero1.size == 8 and cfg.grad_scaler.hysteresis == 2 and cfg.enable_tb is True
    assert cfg.hybrid_zero_optimizer.clip_grad_norm == 1.0
    # From demo.py itself, later assignments winning as in Python.
    assert cfg.JOB_NAME == "7b_train" and cfg.HIDDEN_SIZE == 4096 and cfg.VOCAB_SIZE == 103168
    assert cfg.ckpt.load_ckpt_info is None  # path=None: nothing to load
    assert not [m for m in sys.modules if m.split(".")[0] in ("internlm", "configs")]
    assert warnings_of(logs) == []
    assert plan.plan_start(cfg, {}).source == "fresh"  # before compiling anything
    train(cfg)


def test_7b_sft_uses_load_ckpt_info_ignores_the_legacy_key_and_names_the_fix_for_its_placeholder(evo, logs):
    cfg = load(evo / "7B_sft.py", *SIZES)
    assert cfg.ckpt.load_ckpt_info.to_dict() == dict(
        path="local:llm_ckpts/xxxx", content=("model",), ckpt_type="internevo"
    )
    (warning,) = warnings_of(logs)
    assert "ckpt.load_ckpt_info is set, so the legacy ckpt.load_ckpt_folder='local:llm_ckpts/' is ignored" in warning
    # The placeholder path stops the run before compiling (silently training from scratch is InternEvo's trap) and
    # says how to start from scratch instead.
    with pytest.raises(CheckpointError) as e:
        plan.plan_start(cfg, {})
    message = str(e.value)
    assert "llm_ckpts/xxxx does not exist" in message and "relative to the working directory" in message
    assert "to start from scratch instead, set load_ckpt_info=None" in message
    assert "--config.ckpt.load_ckpt_info=None" in message


def test_7b_sft_placeholder_exits_3_from_launch(evo):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={evo / '7B_sft.py'}", "--launcher=local"]
        + [f"--config.{o}" for o in SIZES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "set load_ckpt_info=None" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_7b_sft_trains_once_given_the_fix_the_error_names(evo):
    train(load(evo / "7B_sft.py", *SIZES, "ckpt.load_ckpt_info=None"))


def test_7b_isp_sft_ckpt_keys(evo, logs):
    """Only the checkpoint keys here: its isp 2 x weight 4 layout is another test's business."""
    cfg = load(evo / "7B_isp_sft.py", *SIZES)
    assert (cfg.parallel.tensor.mode, cfg.parallel.tensor.size, cfg.parallel.weight.size) == ("isp", 2, 4)
    assert cfg.ckpt.load_ckpt_info.path == "local:llm_ckpts/xxxx"
    assert len([w for w in warnings_of(logs) if "legacy ckpt.load_ckpt_folder" in w]) == 1
    with pytest.raises(CheckpointError, match="set load_ckpt_info=None"):
        plan.plan_start(cfg, {})
    cfg = load(evo / "7B_isp_sft.py", *SIZES, "ckpt.load_ckpt_info=None")
    assert plan.plan_start(cfg, {}).source == "fresh"


def test_7b_isp_sft_trains_in_its_own_isp2_x_weight4_layout(evo):
    """InternEvo's isp layout as shipped: sequence parallel 2, weights over groups of 4 ranks (8 fake devices)."""
    from internevo_jax import mesh as mesh_lib

    cfg = load(evo / "7B_isp_sft.py", *SIZES, "ckpt.load_ckpt_info=None")
    mesh = mesh_lib.make_mesh(cfg.parallel)
    assert mesh.shape["sequence"] == 2 and mesh.shape["sequence"] * mesh.shape["weight"] == 4
    rows = train(cfg)
    assert rows[0]["num_consumed_tokens"] == 4 * cfg.data.micro_num * cfg.data.packed_length  # 4 data-parallel rows


@pytest.mark.parametrize("name, model_type", [("7B_internlm2.py", "INTERNLM2_PUBLIC"), ("7B_llama2.py", "LLAMA2")])
def test_gqa_files_train_with_size_overrides_only(evo, name, model_type):
    cfg = load(evo / name, *GQA_SIZES)
    assert cfg.model_type == model_type
    train(cfg)


@pytest.mark.parametrize("name, model_type", [("7B_internlm2.py", "INTERNLM2_PUBLIC"), ("7B_llama2.py", "LLAMA2")])
def test_gqa_files_load_unchanged(evo, logs, name, model_type):
    cfg = load(evo / name, *GQA_SIZES)
    assert cfg.model_type == model_type and cfg.model.num_kv_attention_heads == 2 and cfg.data.total_steps == 2
    assert cfg.ckpt.load_ckpt_info is None and cfg.ckpt.auto_resume is False
    assert warnings_of(logs) == []
    assert plan.plan_start(cfg, {}).source == "fresh"


def test_7b_moe4_sft_loads_as_internevo_reads_it(evo):
    cfg = load(evo / "7B_MoE4_sft.py", *SIZES, "ckpt.load_ckpt_info=None")
    assert cfg.model_type == "INTERNLM_MoE" and cfg.model.num_experts == 4 and cfg.model.moe_type == "GShard"
    assert cfg.moe.top_k == 2 and cfg.moe.min_capacity == 4 and cfg.moe.drop_tokens and cfg.moe.use_rts
    assert cfg.loss.moe_loss_coeff == 0.1
    assert cfg.model.moe.to_dict() == cfg.moe.to_dict()  # the model reads its copy
    assert cfg.model.no_bias is False and cfg.model.qk_interleaved is False  # InternLM1 blocks


def test_7b_moe4_sft_trains_with_size_overrides_loss_falls_and_moe_loss_is_logged(evo, logs):
    """As 7B_sft.py: the placeholder load_ckpt_info is the one change the error names (to start from scratch)."""
    rows = train(load(evo / "7B_MoE4_sft.py", *SIZES, "data.total_steps=8", "adam.lr=1e-3", "ckpt.load_ckpt_info=None"))
    assert all(0 < r["moe_loss"] < 1 for r in rows)  # 0.1 x 2 layers x about 1 (balanced routing)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]
    lines = [m for r in logs if " step=" in (m := r.getMessage())]
    assert len(lines) == 8 and all(" moe_loss=" in x for x in lines)
    assert lines[0].index(" grad_norm=") < lines[0].index(" moe_loss=") < lines[0].index(" micro_num=")


# ---------------------------------------------------------------------------------------------------------------------
# Our own configs/7b_sft.py: the design card's command runs as shipped (from scratch on dummy data).


def test_shipped_7b_sft_has_nothing_to_load(logs):
    cfg = config_lib.load(ROOT / "configs" / "7b_sft.py")
    assert cfg.ckpt.load_ckpt_info is None and warnings_of(logs) == []
    assert cfg.data.train_folder is None  # dummy data
    assert plan.plan_start(cfg, {}).source == "fresh"


def test_shipped_7b_sft_trains_with_size_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(load(ROOT / "configs" / "7b_sft.py", *SIZES))
