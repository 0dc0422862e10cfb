"""The one config schema: every InternEvo section and key, each leaf's default with its type, range and source.

A leaf is ``K(default, *types, interval=..., follows=...)``:

- ``types``: what the key accepts beyond its default's type (none given: the default's type, ``int`` for a float
  too; a ``None`` default without types accepts anything). None is accepted where the default is None or types are
  given.
- ``interval``: the obvious range of a number, ``"[1, inf)"`` style ("[" / "]" closed, "(" / ")" open; NaN is in
  no range, inf only where the interval says "inf]"). Checked as loaded; None (a derived default not filled yet) is
  skipped.
- ``follows``: a derived key: it takes the dotted key's value unless the user set it to something else.

A section is a ``dict`` of leaves and sections; ``Section(shorthand="size", ...)`` is one InternEvo also accepts as
a bare int (``parallel=dict(tensor=2)``: the int is the size). Keys marked "ours" are not InternEvo's. Defaults live
here and nowhere else (InternEvo's sections: docs/internevo_parity.md#config-sections).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ml_collections

INF = float("inf")


@dataclass(frozen=True, init=False)
class K:
    """One leaf of the schema (see the module docstring)."""

    default: Any
    types: tuple[type, ...] | None = None
    interval: str | None = None
    follows: str | None = None

    def __init__(self, default: Any, *types: type, interval: str | None = None, follows: str | None = None):
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "types", types or None)
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "follows", follows)

    def expected_types(self) -> tuple[type, ...] | None:
        """The types a value may have (None: anything)."""
        if self.types is not None:
            return self.types
        default = self.default
        if default is None:
            return None
        if isinstance(default, bool):
            return (bool,)
        if isinstance(default, int):
            return (int,)
        if isinstance(default, float):
            return (int, float)
        if isinstance(default, (list, tuple)):
            return (list, tuple)
        return (type(default),)


class Section(dict):
    """A section InternEvo also accepts as a bare int, which sets the key ``shorthand``."""

    def __init__(self, shorthand: str, **keys: Any):
        super().__init__(**keys)
        self.shorthand = shorthand


POSITIVE, NON_NEGATIVE, STD = "[1, inf)", "[0, inf)", "[0, inf)"
SEED = "[0, 4294967296)"  # numpy's seed range (np.random.seed, RandomState)
FLOAT_OR_INT = (int, float)
SCHEMA: dict[str, Any] = dict(
    JOB_NAME=K("AnonymousJob"),
    model_type=K("INTERNLM"),
    seed=K(1024, interval=SEED),  # ours: InternEvo takes it from --seed only; the CLI flag still wins
    run_folder=K(None, str),  # ours: None -> RUN/{JOB_NAME}/{timestamp}
    cudnn_deterministic=K(False),
    cudnn_benchmark=K(False),
    use_fp32_norm=K(False),
    metric_dtype=K(None, str),
    enable_tb=K(True),
    tensorboard_folder=K(None, str),
    resume_tb_folder=K(None, str),
    alert_address=K(None, str),
    batch_count=K(0, interval=NON_NEGATIVE),
    model=dict(
        checkpoint=K(False, bool, int, float),
        num_chunks=K(1, interval=POSITIVE),
        dtype=K("torch.float16"),
        use_flash_attn=K(True),
        embed_split_hidden=K(False),
        embed_grad_scale=K(1.0, *FLOAT_OR_INT, interval="[0, 1]"),
        parallel_output=K(True),
        vocab_size=K(103168, interval=POSITIVE),
        hidden_size=K(4096, interval=POSITIVE),
        num_layers=K(32, interval=POSITIVE),
        num_attention_heads=K(32, interval=POSITIVE),
        num_kv_attention_heads=K(None, int, interval=POSITIVE),  # None -> num_attention_heads (MHA)
        head_dim=K(None, int, interval=POSITIVE),  # ours (HF head_dim): None -> hidden_size / num_attention_heads
        mlp_ratio=K(8 / 3, *FLOAT_OR_INT, interval="(0, inf)"),
        multiple_of=K(256, interval=POSITIVE),
        norm_type=K("rmsnorm"),
        layer_norm_epsilon=K(1e-5, interval="(0, inf)"),
        apply_post_layer_norm=K(False),
        drop_rate=K(0.0, interval="[0, 1)"),
        attn_drop_rate=K(0.0, interval="[0, 1)"),
        residual_in_fp32=K(False),
        max_position_embeddings=K(2048),
        use_dynamic_ntk_rope=K(False),
        rope_scaling_factor=K(1.0),  # ours: dynamic NTK's alpha (M-08; InternEvo: 1.0), or the linear/llama3 factor
        rope_scaling_type=K(None),  # ours: None | "linear" | "llama3" (HF rope_type; dynamic NTK: the switch above)
        rope_low_freq_factor=K(1.0),  # ours: llama3 scaling's low_freq_factor
        rope_high_freq_factor=K(4.0),  # ours: llama3 scaling's high_freq_factor
        rope_original_max_position_embeddings=K(None),  # ours: llama3's training length; None: max_position_embeddings
        rope_base=K(10000, *FLOAT_OR_INT, interval="(0, inf)"),
        no_bias=K(None, bool),  # None -> the model type's own default (INTERNLM: biases; others: none)
        # The model-type defaults of the keys below: config.model_checks.FAMILY_DEFAULTS (QWEN2, GEMMA, BAICHUAN2 ...).
        qkv_bias=K(None, bool),  # InternEvo v0.5 (QWEN2): q/k/v biases; None -> not no_bias (QWEN2: True)
        o_bias=K(None, bool),  # InternEvo v0.5 (QWEN2): the output projection's bias; None -> not no_bias
        hidden_act=K(None, str),  # ours (HF's name): the gated MLP's activation, silu | gelu_tanh; None -> silu (GEMMA:
        # gelu_tanh, GeGLU; InternEvo's 7B_gemma.py says so with use_swiglu=False)
        add_unit_offset=K(None, bool),  # InternEvo v0.5 (GEMMA): RMSNorm scales by (1 + weight); None -> False
        embed_scale=K(None, bool),  # ours: embeddings x sqrt(hidden_size) in the model dtype; None -> False (GEMMA)
        tie_word_embeddings=K(None, bool),  # ours (HF's name): the head is tok_embeddings^T; None -> False (GEMMA)
        use_sliding_window=K(False),  # InternEvo v0.5 (QWEN2): only a window >= data.seq_len (no effect) is accepted
        sliding_window=K(None, int, interval=POSITIVE),  # the window of use_sliding_window
        max_window_layers=K(None, int),  # InternEvo v0.5 (QWEN2), with use_sliding_window; read, no effect here
        enable_qkv_fusion=K(True),  # InternEvo v0.5: wqkv vs wq/wk/wv params; a storage choice, we always fuse
        mlp_layer_fusion=K(False),  # InternEvo v0.5: fused w1/w3; a storage choice, no effect here
        adapt_hf=K(None, bool),  # None -> the model type's own default (LLAMA2: False, Meta layout; others: True)
        qk_interleaved=K(None, bool),  # None -> not adapt_hf (InternEvo v0.5's name for the same switch)
        norm_head=K(None, bool),  # None -> the model type's own default (BAICHUAN2: True; others: False)
        dropout_selective_checkpoint=K(True),
        use_scaled_init=K(True),
        use_swiglu=K(True),
        init_type=K("normal"),
        embedding_init_std=K(None, float, interval=STD),  # None -> the model type's own default (M-10)
        attn_wqkv_init_std=K(None, float, interval=STD),
        attn_other_init_std=K(None, float, interval=STD),
        ffn_uplayer_init_std=K(None, float, interval=STD),
        ffn_other_init_std=K(None, float, interval=STD),
        out_head_init_std=K(None, float, interval=STD),
        is_reward=K(False),
        num_experts=K(1, interval=POSITIVE),  # > 1 (with a MoE model_type): the MLP becomes a mixture of experts
        moe_use_residual=K(False),
        moe_type=K("GShard"),  # GShard (capacity, drops) | MegaBlock-D (dropless: grouped GEMMs, jax.lax.ragged_dot)
        attn_impl=K("auto"),  # ours: xla | cudnn | pallas (ours) | auto (GPU: the first of cudnn, pallas that runs)
        attn_max_segments=K(64),  # ours: cudnn packed attention's static bound on segments per row (host-checked)
        remat_policy=K("none"),  # ours: remat policy of the layers model.checkpoint leaves out (none = save all)
        scan_layers=K(True),  # ours: layers under lax.scan (False: a Python loop, for profiling)
        # the top-level use_fp32_norm, so the model reads only its own section
        use_fp32_norm=K(None, bool, follows="use_fp32_norm"),
        moe=K(None, dict, follows="moe"),  # ours: the top-level moe section, for the same reason
    ),
    data=dict(
        type=K("tokenized"),
        seq_len=K(None, int, interval=POSITIVE),  # required
        micro_bsz=K(None, int, interval=POSITIVE),  # required
        micro_num=K(1, interval=POSITIVE),
        gradient_accumulation=K(None, int, follows="data.micro_num"),
        packed_length=K(None, int),  # InternEvo ignores a user value (= seq_len * micro_bsz)
        train_folder=K(None, str),
        valid_folder=K(None, str),
        valid_micro_num=K(None, int, follows="data.micro_num"),
        valid_every=K(0),
        total_steps=K(50000, interval=POSITIVE),
        skip_batches=K(""),
        rampup_batch_size=K("", str),
        min_length=K(0),
        min_length_dict=K(None, dict),
        pack_sample_into_one=K(False),
        seed=K(1024, interval=SEED),
        num_worker=K(4, interval=NON_NEGATIVE),
        empty_cache_and_diag_interval=K(50),
        diag_outlier_ratio=K(1.1),
        use_packed_dataset=K(True),
        fixed_random_dataset_seqlen=K(False),
        use_shm=K(False),
        shm_path=K("/dev/shm/metacache"),
        tokenizer_path=K(None, str),
        subset_name=K(None, str),
        content_name=K("text"),
        num_dummy_samples=K(1_000_000, interval=POSITIVE),  # ours: RandomDataset size (InternEvo: 1,000,000)
    ),
    parallel=dict(
        zero1=Section("size", size=K(-1), fsdp=K(False)),
        tensor=Section("size", size=K(1), mode=K("mtp")),
        pipeline=Section("size", size=K(1), interleaved_overlap=K(False)),
        weight=Section("size", size=K(1), overlap=K(False), memory_pool=K(False)),
        sequence_parallel=K(None, bool),  # derived: True for msp/fsp/isp
        # size -1: InternEvo's min(dp, num_experts); num_experts (ours) follows the model's, for the mesh
        expert=dict(size=K(-1), no_tp=K(False), num_experts=K(None, int, follows="model.num_experts")),
    ),
    hybrid_zero_optimizer=dict(
        overlap_sync_grad=K(False),
        overlap_sync_param=K(False),
        reduce_bucket_size=K(512 * 1024 * 1024),
        clip_grad_norm=K(0.0, interval=NON_NEGATIVE),
        use_split_tensor_optim=K(False),
        all_gather_size=K(512 * 1024 * 1024),
        # ours: stop after this many non-finite steps in a row (each one is skipped; the params stop moving)
        max_consecutive_inf_nan=K(100),
    ),
    grad_scaler=dict(
        fp16=dict(
            initial_scale=K(2**16, *FLOAT_OR_INT, interval="(0, inf)"),
            min_scale=K(1, *FLOAT_OR_INT, interval="(0, inf)"),
            growth_interval=K(1000, interval=POSITIVE),
        ),
        growth_factor=K(2.0, interval="(1, inf)"),  # InternEvo's DynamicGradScaler asserts these four
        backoff_factor=K(0.5, interval="(0, 1)"),
        max_scale=K(2**24, *FLOAT_OR_INT, interval="(0, inf)"),
        hysteresis=K(2, interval=POSITIVE),
    ),
    adam=dict(
        lr=K(1e-4, interval=NON_NEGATIVE),
        adam_beta1=K(0.9, interval="[0, 1)"),
        adam_beta2=K(0.95, interval="[0, 1)"),
        adam_beta2_c=K(0.0),
        adam_eps=K(1e-8, interval="(0, inf)"),
        weight_decay=K(0.01, interval=NON_NEGATIVE),
    ),
    lr_scheduler=dict(
        total_steps=K(None, int, interval=POSITIVE, follows="data.total_steps"),
        init_steps=K(0, interval=NON_NEGATIVE),
        warmup_ratio=K(0.01, interval="[0, 1]"),
        eta_min=K(1e-5, interval=NON_NEGATIVE),
        last_epoch=K(-1),
    ),
    beta2_scheduler=dict(
        init_beta2=K(None, float, interval="[0, 1)", follows="adam.adam_beta2"),
        c=K(None, *FLOAT_OR_INT, follows="adam.adam_beta2_c"),
        cur_iter=K(-1),
    ),
    loss=dict(
        label_smoothing=K(0.0, interval="[0, 1)"),
        moe_loss_coeff=K(1.0, interval=NON_NEGATIVE),
        logits_chunk_size=K(1024),  # ours: tokens per slice of the fused head + loss (0: whole rows at once)
    ),
    ckpt=dict(
        enable_save_ckpt=K(True),
        save_ckpt_folder=K(None, str),
        checkpoint_every=K(None, *FLOAT_OR_INT),  # required when saving; inf otherwise
        oss_snapshot_freq=K(INF, *FLOAT_OR_INT),
        snapshot_ckpt_folder=K(None, str),
        async_upload=K(False),
        async_upload_tmp_folder=K("/dev/shm/internlm_tmp_ckpt/"),
        load_ckpt_info=K(None, dict),
        load_ckpt_folder=K(None, str),
        load_model_only_folder=K(None, str),
        load_optimizer=K(True),
        load_given_ckpt=K(False),
        auto_resume=K(True),
        stop_file_path=K(None, str),
        max_to_keep=K(None, int),  # ours: keep the newest N (None: all)
        restore_unverified=K(False),  # ours: resume a step without manifest.json (unchecked); it is sealed after
        accept_data_change=K(False),  # ours: resume although data keys that shape the data stream changed
    ),
    monitor=dict(
        alert=dict(
            enable_feishu_alert=K(False),
            feishu_alert_address=K(None, str),
            light_monitor_address=K(None, str),
            alert_file_path=K(None, str),
            webhook_format=K("feishu"),  # ours: feishu (InternEvo's card) | json (a generic JSON POST)
            loss_spike_ratio=K(1.5, *FLOAT_OR_INT),  # MON-03: alert when loss > ratio x the previous step's loss
            heartbeat_every=K(50),  # MON-05: light_monitor heartbeat interval, in batches
        ),
        tensorboard=dict(queue_max_length=K(1)),
        # ours: a step (or eval) running longer dumps all stacks and exits; 0: off
        hang_timeout_seconds=K(1800.0, *FLOAT_OR_INT),
        slow_step_ratio=K(3.0, *FLOAT_OR_INT),  # ours: warn when a step takes longer than ratio x the recent median
        profile_start_step=K(3),  # ours: --profiling traces batches [start, start + num_steps) with jax.profiler
        profile_num_steps=K(2),
    ),
    moe=dict(
        top_k=K(1, interval="[1, 2]"),
        capacity_factor=K(1.0, interval="(0, inf)"),
        eval_capacity_factor=K(1.0, interval="(0, inf)"),
        min_capacity=K(4, interval=NON_NEGATIVE),
        noisy_gate_policy=K(None, str),
        drop_tokens=K(True),
        use_rts=K(True),
    ),
    generation=dict(
        ckpt_folder=K(None),
        output_folder=K(None),
        data_folder=K(None),
        tokenizer_path=K(None),
        batch_size=K(1),
        eos_id=K([2, 0], int, list, tuple),
        bos_id=K(1),
        max_length=K(100),
        do_sample=K(True),
        temperature=K(1.0, *FLOAT_OR_INT),
        top_k=K(50),
        top_p=K(1.0),
        repetition_penalty=K(1.0, *FLOAT_OR_INT),
        length_penalty=K(1.0),
        num_beams=K(1),
        additional_eos_token_list=K(None, list, tuple, int),
    ),
)

# The choices of a few string keys (checked per section in checks.py).
DTYPES = {
    "torch.bfloat16": "bfloat16",
    "torch.float16": "float16",
    "torch.half": "float16",
    "torch.float32": "float32",
    "torch.tf32": "float32",
}
TENSOR_MODES = ("mtp", "msp", "fsp", "isp")
ATTN_IMPLS = ("xla", "cudnn", "pallas", "auto")
REMAT_POLICIES = ("none", "save_dots", "save_qkv_out")
DATA_TYPES = ("tokenized", "dummy", "hf", "streaming")
MOE_TYPES = ("GShard", "MegaBlock-D")  # capacity-based GShard gating | dropless grouped GEMMs (moe.py)
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
CKPT_TYPES = ("internevo", "hf", "hf_llama", "llama")
CKPT_CONTENTS = ("model", "sampler", "optimizer", "scheduler", "all")
# The model_type names a config may use: InternEvo's decoders, and those added by model.register_model (which adds
# the name here, so the config names the valid types without importing the model). INTERNLM_MoE is InternLM1 with
# mixture-of-experts MLPs; MIXTRALMOE (InternEvo v0.5's name) Llama blocks with them (HF layout, no biases).
MODEL_TYPES = {
    "INTERNLM",
    "INTERNLM2_PUBLIC",
    "INTERNLM2",
    "INTERNLM3",
    "LLAMA2",
    "QWEN2",
    "GEMMA",
    "BAICHUAN2",
    "INTERNLM_MoE",
    "MIXTRALMOE",
}


def _defaults_of(node: Any) -> Any:
    return {k: _defaults_of(v) for k, v in node.items()} if isinstance(node, dict) else _copy(node.default)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def defaults() -> dict[str, Any]:
    """The schema's defaults as plain nested dicts (a fresh copy)."""
    return _defaults_of(SCHEMA)


def default_config() -> ml_collections.ConfigDict:
    """Every section and key with InternEvo's defaults (required keys such as ``data.seq_len`` are None)."""
    return ml_collections.ConfigDict(defaults())


def leaves(node: dict[str, Any] = SCHEMA, prefix: str = "") -> Iterator[tuple[str, K]]:
    """``(dotted key, leaf)`` for every leaf, in schema order."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def lookup(dotted: str) -> Any:
    """The schema node (a ``K`` leaf or a section dict) at ``dotted``; None if there is none."""
    node: Any = SCHEMA
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def ffn_width(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternEvo's SwiGLU width: ``multiple_of * ceil(int(hidden * mlp_ratio) / multiple_of)`` (M-14)."""
    return multiple_of * math.ceil(int(hidden_size * mlp_ratio) / multiple_of)


def jax_dtype_name(model_cfg: ml_collections.ConfigDict) -> str:
    """The JAX compute dtype name for ``model.dtype`` (params stay fp32 masters)."""
    return DTYPES[model_cfg.dtype]


def is_moe_model_type(model_type: str) -> bool:
    """InternEvo's mixture-of-experts model types (``INTERNLM_MoE``; later ``QWEN2MOE``, ``MIXTRALMOE``): InternEvo
    itself tests ``"MoE" in model_type``; any case here."""
    return "moe" in str(model_type).lower()
