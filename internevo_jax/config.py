"""The one config schema: every InternEvo section and default, file loading (both styles), overrides, validation.

A config file is either InternEvo-style (module-level ``model = dict(...)``, ``data = dict(...)``, upper-case helper
variables such as ``SEQ_LEN``, base files imported ``with read_base():`` from ``configs._base_``) or
ml_collections-style (a ``get_config()`` returning a dict/ConfigDict). Both are merged onto ``default_config()``, then
``--config.a.b=v`` overrides are applied, derived defaults are filled in, and cross-field checks run. The result is
one locked ``ml_collections.ConfigDict``.

Defaults live here and nowhere else (InternEvo's sections: docs/internevo_parity.md#config-sections).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import re
import runpy
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.redaction import redact_config  # standard library only: the config stays a leaf

INF = float("inf")

# ---------------------------------------------------------------------------------------------------------------------
# Schema. A leaf's default value fixes its type unless _TYPES says otherwise. Keys marked "ours" are not InternEvo's.
# ---------------------------------------------------------------------------------------------------------------------


def _defaults() -> dict[str, Any]:
    return dict(
        JOB_NAME="AnonymousJob",
        model_type="INTERNLM",
        seed=1024,  # ours: InternEvo takes it from --seed only; the CLI flag still wins
        run_folder=None,  # ours: None -> RUN/{JOB_NAME}/{timestamp}
        cudnn_deterministic=False,
        cudnn_benchmark=False,
        use_fp32_norm=False,
        metric_dtype=None,
        enable_tb=True,
        tensorboard_folder=None,
        resume_tb_folder=None,
        alert_address=None,
        batch_count=0,
        model=dict(
            checkpoint=False,
            num_chunks=1,
            dtype="torch.float16",
            use_flash_attn=True,
            embed_split_hidden=False,
            embed_grad_scale=1.0,
            parallel_output=True,
            vocab_size=103168,
            hidden_size=4096,
            num_layers=32,
            num_attention_heads=32,
            num_kv_attention_heads=None,  # None -> num_attention_heads (MHA)
            mlp_ratio=8 / 3,
            multiple_of=256,
            norm_type="rmsnorm",
            layer_norm_epsilon=1e-5,
            apply_post_layer_norm=False,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            residual_in_fp32=False,
            max_position_embeddings=2048,
            use_dynamic_ntk_rope=False,
            rope_scaling_factor=1.0,  # ours: dynamic NTK's alpha (M-08; InternEvo: 1.0), or the linear/llama3 factor
            rope_scaling_type=None,  # ours: None | "linear" | "llama3" (HF rope_type; dynamic NTK: the switch above)
            rope_low_freq_factor=1.0,  # ours: llama3 scaling's low_freq_factor
            rope_high_freq_factor=4.0,  # ours: llama3 scaling's high_freq_factor
            rope_original_max_position_embeddings=None,  # ours: llama3's training length; None: max_position_embeddings
            rope_base=10000,
            no_bias=None,  # None -> the model type's own default (INTERNLM: biases; others: none)
            adapt_hf=None,  # None -> the model type's own default (LLAMA2: False, Meta layout; others: True)
            qk_interleaved=None,  # None -> not adapt_hf (InternEvo v0.5's name for the same switch)
            norm_head=False,
            dropout_selective_checkpoint=True,
            use_scaled_init=True,
            use_swiglu=True,
            init_type="normal",
            embedding_init_std=None,  # None -> the model type's own default (M-10)
            attn_wqkv_init_std=None,
            attn_other_init_std=None,
            ffn_uplayer_init_std=None,
            ffn_other_init_std=None,
            out_head_init_std=None,
            is_reward=False,
            num_experts=1,
            moe_use_residual=False,
            moe_type="GShard",
            attn_impl="auto",  # ours: xla | cudnn | pallas (ours) | auto (GPU: the first of cudnn, pallas that runs)
            attn_max_segments=64,  # ours: cudnn packed attention's static bound on segments per row (host-checked)
            remat_policy="none",  # ours: remat policy of the layers that model.checkpoint leaves out (none = save all)
            scan_layers=True,  # ours: layers under lax.scan (False: a Python loop, for profiling)
            use_fp32_norm=None,  # derived: the top-level use_fp32_norm, so the model reads only its own section
        ),
        data=dict(
            type="tokenized",
            seq_len=None,  # required
            micro_bsz=None,  # required
            micro_num=1,
            gradient_accumulation=None,  # derived: micro_num
            packed_length=None,  # InternEvo ignores a user value (= seq_len * micro_bsz)
            train_folder=None,
            valid_folder=None,
            valid_micro_num=None,  # derived: micro_num
            valid_every=0,
            total_steps=50000,
            skip_batches="",
            rampup_batch_size="",
            min_length=0,
            min_length_dict=None,
            pack_sample_into_one=False,
            seed=1024,
            num_worker=4,
            empty_cache_and_diag_interval=50,
            diag_outlier_ratio=1.1,
            use_packed_dataset=True,
            fixed_random_dataset_seqlen=False,
            use_shm=False,
            shm_path="/dev/shm/metacache",
            tokenizer_path=None,
            subset_name=None,
            content_name="text",
            num_dummy_samples=1_000_000,  # ours: RandomDataset size (InternEvo hard-codes 1,000,000)
        ),
        parallel=dict(
            zero1=dict(size=-1, fsdp=False),
            tensor=dict(size=1, mode="mtp"),
            pipeline=dict(size=1, interleaved_overlap=False),
            weight=dict(size=1, overlap=False, memory_pool=False),
            sequence_parallel=None,  # derived: True for msp/fsp/isp
            expert=dict(size=-1, no_tp=False),
        ),
        hybrid_zero_optimizer=dict(
            overlap_sync_grad=False,
            overlap_sync_param=False,
            reduce_bucket_size=512 * 1024 * 1024,
            clip_grad_norm=0.0,
            use_split_tensor_optim=False,
            all_gather_size=512 * 1024 * 1024,
            # ours: stop after this many non-finite steps in a row (each one is skipped; the params stop moving)
            max_consecutive_inf_nan=100,
        ),
        grad_scaler=dict(
            fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
            growth_factor=2.0,
            backoff_factor=0.5,
            max_scale=2**24,
            hysteresis=2,
        ),
        adam=dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0.0, adam_eps=1e-8, weight_decay=0.01),
        lr_scheduler=dict(total_steps=None, init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1),
        beta2_scheduler=dict(init_beta2=None, c=None, cur_iter=-1),
        loss=dict(
            label_smoothing=0.0,
            moe_loss_coeff=1.0,
            logits_chunk_size=1024,  # ours: tokens per slice of the fused head + loss (0: whole rows at once)
        ),
        ckpt=dict(
            enable_save_ckpt=True,
            save_ckpt_folder=None,
            checkpoint_every=None,  # required when saving; inf otherwise
            oss_snapshot_freq=INF,
            snapshot_ckpt_folder=None,
            async_upload=False,
            async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
            load_ckpt_info=None,
            load_ckpt_folder=None,
            load_model_only_folder=None,
            load_optimizer=True,
            load_given_ckpt=False,
            auto_resume=True,
            stop_file_path=None,
            max_to_keep=None,  # ours: keep the newest N (None: all)
            restore_unverified=False,  # ours: resume a step without manifest.json (unchecked); it is sealed after
            accept_data_change=False,  # ours: resume although data keys that shape the data stream changed
        ),
        monitor=dict(
            alert=dict(
                enable_feishu_alert=False,
                feishu_alert_address=None,
                light_monitor_address=None,
                alert_file_path=None,
                webhook_format="feishu",  # ours: feishu (InternEvo's card) | json (a generic JSON POST)
                loss_spike_ratio=1.5,  # MON-03: alert when loss > ratio x the previous step's loss
                heartbeat_every=50,  # MON-05: light_monitor heartbeat interval, in batches
            ),
            tensorboard=dict(queue_max_length=1),
            hang_timeout_seconds=1800.0,  # ours: a step (or eval) running longer dumps all stacks and exits; 0: off
            slow_step_ratio=3.0,  # ours: warn when a step takes longer than ratio x the median of recent steps
            profile_start_step=3,  # ours: --profiling traces batches [start, start + num_steps) with jax.profiler
            profile_num_steps=2,
        ),
        moe=dict(
            top_k=1,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            min_capacity=4,
            noisy_gate_policy=None,
            drop_tokens=True,
            use_rts=True,
        ),
        generation=dict(
            ckpt_folder=None,
            output_folder=None,
            data_folder=None,
            tokenizer_path=None,
            batch_size=1,
            eos_id=[2, 0],
            bos_id=1,
            max_length=100,
            do_sample=True,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            repetition_penalty=1.0,
            length_penalty=1.0,
            num_beams=1,
            additional_eos_token_list=None,
        ),
    )


def default_config() -> ml_collections.ConfigDict:
    """Every section and key with InternEvo's defaults (required keys such as ``data.seq_len`` are None)."""
    return ml_collections.ConfigDict(_defaults())


# Leaves that accept more than their default's type (name -> allowed types). None is allowed where the default is None.
_TYPES: dict[str, tuple[type, ...]] = {
    "model.checkpoint": (bool, int, float),
    "model.mlp_ratio": (int, float),
    "model.num_kv_attention_heads": (int,),
    "model.no_bias": (bool,),
    "model.adapt_hf": (bool,),
    "model.qk_interleaved": (bool,),
    "model.use_fp32_norm": (bool,),
    "model.embed_grad_scale": (int, float),
    "model.rope_base": (int, float),
    "model.embedding_init_std": (float,),
    "model.attn_wqkv_init_std": (float,),
    "model.attn_other_init_std": (float,),
    "model.ffn_uplayer_init_std": (float,),
    "model.ffn_other_init_std": (float,),
    "model.out_head_init_std": (float,),
    "data.seq_len": (int,),
    "data.micro_bsz": (int,),
    "data.gradient_accumulation": (int,),
    "data.packed_length": (int,),
    "data.valid_micro_num": (int,),
    "data.train_folder": (str,),
    "data.valid_folder": (str,),
    "data.rampup_batch_size": (str,),
    "data.min_length_dict": (dict,),
    "data.tokenizer_path": (str,),
    "data.subset_name": (str,),
    "parallel.sequence_parallel": (bool,),
    "lr_scheduler.total_steps": (int,),
    "grad_scaler.fp16.initial_scale": (int, float),
    "grad_scaler.fp16.min_scale": (int, float),
    "grad_scaler.max_scale": (int, float),
    "beta2_scheduler.init_beta2": (float,),
    "beta2_scheduler.c": (int, float),
    "ckpt.save_ckpt_folder": (str,),
    "ckpt.snapshot_ckpt_folder": (str,),
    "ckpt.checkpoint_every": (int, float),
    "ckpt.oss_snapshot_freq": (int, float),
    "ckpt.load_ckpt_info": (dict,),
    "ckpt.load_ckpt_folder": (str,),
    "ckpt.load_model_only_folder": (str,),
    "ckpt.stop_file_path": (str,),
    "ckpt.max_to_keep": (int,),
    "generation.eos_id": (int, list, tuple),
    "generation.additional_eos_token_list": (list, tuple, int),
    "generation.repetition_penalty": (int, float),
    "generation.temperature": (int, float),
    "metric_dtype": (str,),
    "tensorboard_folder": (str,),
    "resume_tb_folder": (str,),
    "alert_address": (str,),
    "run_folder": (str,),
    "monitor.alert.feishu_alert_address": (str,),
    "monitor.alert.light_monitor_address": (str,),
    "monitor.alert.alert_file_path": (str,),
    "monitor.alert.loss_spike_ratio": (int, float),
    "monitor.hang_timeout_seconds": (int, float),
    "monitor.slow_step_ratio": (int, float),
    "moe.noisy_gate_policy": (str,),
}

# Sections InternEvo accepts as a bare int: the int is the size.
_INT_SHORTHAND = {
    "parallel.zero1": "size",
    "parallel.tensor": "size",
    "parallel.pipeline": "size",
    "parallel.weight": "size",
}

# (derived, source): the derived key follows its source unless the user set it to something else.
_DERIVED = (
    ("data.gradient_accumulation", "data.micro_num"),
    ("model.use_fp32_norm", "use_fp32_norm"),
    ("data.valid_micro_num", "data.micro_num"),
    ("lr_scheduler.total_steps", "data.total_steps"),
    ("beta2_scheduler.init_beta2", "adam.adam_beta2"),
    ("beta2_scheduler.c", "adam.adam_beta2_c"),
)

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


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key, the place and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_base() -> Iterator[None]:
    """InternEvo's (mmengine's) marker around the imports of base config files::

        from internlm.utils.utils import read_base  # or: from internevo_jax.config import read_base

        with read_base():
            from configs._base_.models.internlm2_7B import *

    It does nothing itself: the imports inside are ordinary imports. While ``read_config_file`` executes a config
    file, ``internlm.utils.utils.read_base`` is this function (InternEvo need not be installed) and the package
    ``configs`` is the config file's own tree (``_config_imports``).
    """
    yield


# Module names a config file's imports see only while it executes: InternEvo's read_base, and its own configs tree.
_SHIM_MODULES = ("internlm", "internlm.utils", "internlm.utils.utils")
_BASE_PACKAGE = "configs"
_IMPORT_LOCK = threading.RLock()  # the swap of sys.modules entries below is process-wide


def _owned(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in ("internlm", _BASE_PACKAGE))


def base_roots(path: str | Path) -> list[Path]:
    """Where ``configs._base_...`` imports of the config file ``path`` resolve: the folder holding the ``configs``
    folder the file lives in (InternEvo's layout: ``<repo>/configs/demo.py`` imports ``configs._base_``), then the
    file's own folder (a file beside a ``configs/_base_`` tree)."""
    path = Path(path).absolute()
    roots = [parent.parent for parent in path.parents if parent.name == _BASE_PACKAGE][:1] + [path.parent]
    return list(dict.fromkeys(roots))


class _ConfigsFinder:
    """A ``sys.meta_path`` finder for the top-level package ``configs`` only, found under the given roots; its
    submodules (``configs._base_.models.x``) are then found through the package's ``__path__`` as usual."""

    def __init__(self, roots: list[Path]):
        self.dirs = [str(r / _BASE_PACKAGE) for r in roots if (r / _BASE_PACKAGE).is_dir()]

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _BASE_PACKAGE or not self.dirs:
            return None
        init = Path(self.dirs[0]) / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=self.dirs)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # a namespace package over self.dirs
        spec.submodule_search_locations = list(self.dirs)
        return spec

    def invalidate_caches(self) -> None:
        pass


@contextlib.contextmanager
def _config_imports(path: Path) -> Iterator[None]:
    """While a config file executes: ``internlm.utils.utils.read_base`` is ``read_base`` and ``configs`` is the file's
    own tree (``base_roots``). Afterwards ``sys.modules``, ``sys.meta_path`` and the path-importer cache are as
    before: no fake ``internlm`` stays behind, a real one (or another ``configs`` package) imported earlier is put
    back, and the next load imports the base files afresh (an edit between two loads is seen). Base files import
    without writing ``__pycache__`` folders into the user's config tree."""
    with _IMPORT_LOCK:
        saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _owned(n)]}
        cached = set(sys.path_importer_cache)
        finder = _ConfigsFinder(base_roots(path))
        shims = {name: types.ModuleType(name) for name in _SHIM_MODULES}
        for name, module in shims.items():
            if name != "internlm.utils.utils":
                module.__path__ = []  # a package: "import internlm.utils.utils" finds the child in sys.modules
            sys.modules[name] = module
        shims["internlm.utils.utils"].read_base = read_base
        shims["internlm"].utils = shims["internlm.utils"]
        shims["internlm.utils"].utils = shims["internlm.utils.utils"]
        dont_write = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        sys.meta_path.insert(0, finder)
        importlib.invalidate_caches()  # files written a moment ago (same directory mtime) are seen
        try:
            yield
        finally:
            sys.meta_path.remove(finder)
            sys.dont_write_bytecode = dont_write
            for name in [n for n in sys.modules if _owned(n)]:
                del sys.modules[name]
            sys.modules.update(saved)
            for key in set(sys.path_importer_cache) - cached:
                del sys.path_importer_cache[key]


def shipped_configs() -> Path | None:
    """The folder of the configs that come with the package: ``internevo_jax/configs`` when installed (a wheel ships
    the checkout's ``configs/`` there), else the checkout's ``configs/`` beside the package; None if neither."""
    # find_spec, not importlib.resources: runpy executes a config as a file, so a real folder is needed.
    spec = importlib.util.find_spec("internevo_jax.configs")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    folders.append(Path(__file__).resolve().parent.parent / _BASE_PACKAGE)
    return next((f for f in folders if f.is_dir()), None)


def shipped_config_names() -> list[str]:
    """What ``--config=NAME`` accepts: the shipped configs' file names without ``.py`` (not the ``_base_`` parts)."""
    folder = shipped_configs()
    names = folder.glob("*.py") if folder else []
    return sorted(p.stem for p in names if not p.name.startswith(("_", ".")))


def resolve_config_path(path: str | Path) -> Path:
    """The config file ``--config`` means: a path to a file as given (it always wins); else a bare name such as
    ``demo`` or ``internlm2_1_8b.py`` (no folder part) is the shipped config of that name (``shipped_configs``)."""
    given = Path(path)
    if given.is_file():
        return given
    name = str(path)
    if given.name == name and name.removesuffix(".py") in shipped_config_names():
        return shipped_configs() / f"{name.removesuffix('.py')}.py"
    names = ", ".join(shipped_config_names()) or "none found"
    raise ConfigError(
        f"config file {path} does not exist (pass --config=path/to/config.py, or the name of a shipped config: {names})"
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Executes a config file and returns its values as plain nested dicts.

    InternEvo style: every module-level name not starting with ``_`` that is not a module, class or function,
    including those a ``with read_base(): from configs._base_.models.x import *`` brought in (later assignments in
    the file win, as in Python). ml_collections style: the result of ``get_config()``.
    """
    path = resolve_config_path(path)
    try:
        with _config_imports(path):
            namespace = runpy.run_path(str(path))
    except ModuleNotFoundError as e:
        if e.name and _owned(e.name):
            where = " or ".join(str(r / _BASE_PACKAGE) for r in base_roots(path))
            raise ConfigError(
                f"config file {path} failed to execute: {type(e).__name__}: {e}; `{_BASE_PACKAGE}.` imports are "
                f"looked up in {where} (the folder holding the `{_BASE_PACKAGE}` folder the file lives in, or the "
                f"file's own folder), and of InternEvo's `internlm` package only `internlm.utils.utils.read_base` "
                "is provided"
            ) from e
        raise ConfigError(f"config file {path} failed to execute: {type(e).__name__}: {e}") from e
    except Exception as e:  # a broken config file is a user error: show where, not a traceback wall
        raise ConfigError(f"config file {path} failed to execute: {type(e).__name__}: {e}") from e
    if "_base_" in namespace:
        _warn(
            f"{path}: `_base_ = {namespace['_base_']!r}` (an mmengine-style inheritance list) is ignored; import "
            "the base files instead: `with read_base(): from configs._base_.models.<name> import *` (read_base "
            "from internlm.utils.utils or internevo_jax.config)"
        )
    if callable(namespace.get("get_config")):
        values = _plain(namespace["get_config"]())  # a ConfigDict becomes a plain dict here
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: get_config() must return a dict or ConfigDict, got {type(values).__name__}")
        return values
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        values[name] = value
    return _plain(values)


def _warn(message: str) -> None:
    from internevo_jax.monitoring.logger import get_logger  # not at the top: the config loads on its own

    get_logger().warning(message, stacklevel=2)


def _plain(value: Any) -> Any:
    """Deep-copies dicts/ConfigDicts into plain dicts (InternEvo configs may nest Config objects)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class BareFlag:
    """The value of a bare ``--config.a.b`` (True) or ``--noconfig.a.b`` (False): allowed for bool keys only, as
    ml_collections' own config flags allow them."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def parse_override(arg: str) -> tuple[str, Any]:
    """Parses ``--config.a.b=value`` (or ``config.a.b=value``) into ``("a.b", value)``.

    Values are Python literals (``4``, ``1e-4``, ``True``, ``None``, ``[2, 0]``, ``inf``) or ``dict(k=literal, ...)``
    as InternEvo configs write them, ``true``/``false`` in any case (absl's spelling); anything else is a string. A
    bare ``--config.a.b`` is ``True`` and ``--noconfig.a.b`` is ``False`` (bool keys only; see ``BareFlag``).
    ``parse_args`` joins the space form ``--config.a.b 3`` into ``--config.a.b=3`` before it gets here.
    """
    body = arg[2:] if arg.startswith("--") else arg
    if body.startswith("noconfig.") and "=" not in body:
        return body[len("noconfig.") :], BareFlag(False)
    if body.startswith("config.") and "=" not in body and len(body) > len("config."):
        return body[len("config.") :], BareFlag(True)
    if not body.startswith("config.") or "=" not in body:
        raise ConfigError(f"cannot parse override {arg!r}: expected --config.section.key=value")
    key, raw = body[len("config.") :].split("=", 1)
    if raw in ("inf", "+inf", "-inf"):
        return key, float(raw)
    if raw.strip().lower() in ("true", "false"):
        return key, raw.strip().lower() == "true"
    try:
        return key, _literal(ast.parse(raw.strip(), mode="eval").body)
    except (ValueError, SyntaxError):
        return key, raw
    except (RecursionError, MemoryError):
        # CPython's parser recurses once per nesting level (unary minus, brackets, operators); say what, not how.
        raise ConfigError(
            f"--config.{key}: the value ({len(raw)} characters, starting {raw[:20]!r}) is nested too deeply to "
            "parse; give a plain literal such as 4, 1e-4, 'text', [2, 0] or dict(k=v)"
        ) from None


def _literal(node: ast.expr) -> Any:
    """``ast.literal_eval`` plus ``dict(key=literal, ...)`` calls (nested too)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return ast.literal_eval(node)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads a config file (either style), applies ``--config.a.b=v`` overrides and returns the validated config."""
    if path is not None:
        path = resolve_config_path(path)  # a shipped config's name: messages name the file it resolved to
    file_values = read_config_file(path) if path is not None else {}
    return build(file_values, [parse_override(o) for o in overrides], source=str(path))


def build(
    file_values: dict[str, Any], overrides: list[tuple[str, Any]] = (), source: str = "config"
) -> ml_collections.ConfigDict:
    """Merges file values and parsed overrides onto the defaults, fills derived keys and validates."""
    cfg = _defaults()
    explicit_file: dict[str, Any] = {}
    _merge(cfg, _normalize_shorthands(file_values, source), prefix="", source=source, seen=explicit_file)
    file_snapshot = copy.deepcopy(cfg)
    explicit_cli: set[str] = set()
    cli: dict[str, str] = {}  # dotted key -> the override that set it: an error about the key names the override
    for key, value in overrides:
        _set(cfg, key, value, source=f"--config.{key}")
        explicit_cli.add(key)
        cli.update(dict.fromkeys(_dotted_keys(key, value), f"--config.{key}={_short(value)}"))
    for derived, src in _DERIVED:
        if derived in explicit_cli:
            continue
        # A file that sets the derived key to its source's value (7B_sft.py: total_steps=data["total_steps"]) means
        # "same as the source", so it follows a CLI override of the source.
        tied = derived not in explicit_file or explicit_file[derived] == _get(file_snapshot, src)
        if tied:
            _put(cfg, derived, _get(cfg, src))
            if src in cli:
                cli[derived] = cli[src]  # lr_scheduler.total_steps=0 came from --config.data.total_steps=0
    given = set(explicit_file).union(*(_dotted_keys(key, value) for key, value in overrides))
    _finalize(cfg, source, given, cli)
    config = ml_collections.ConfigDict(cfg)
    config.lock()
    from internevo_jax import pipeline  # here, not at the top: pipeline.py imports this module

    try:
        pipeline.check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), source, cli)}: {e}") from None
    return config


# A config key in an error message: a dotted name (data.micro_bsz), or a top-level name before "=" (JOB_NAME='').
_MESSAGE_KEY = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|\b[A-Za-z_]\w*(?==)")


def _blame(message: str, source: str, cli: dict[str, str]) -> str:
    """Where the values an error message names came from: the ``--config.`` overrides that set them (a key's own,
    or the section's it lies in), else the config file ``source``."""
    named = []
    for key in _MESSAGE_KEY.findall(message):
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
        named += [cli[k] for k in prefixes if k in cli][:1]
    return ", ".join(dict.fromkeys(named)) or source


def _dotted_keys(key: str, value: Any) -> set[str]:
    """``("ckpt", {"load_ckpt_info": None})`` -> ``{"ckpt", "ckpt.load_ckpt_info"}``: what an override sets."""
    keys = {key}
    if isinstance(value, dict):
        for k, v in value.items():
            keys |= _dotted_keys(f"{key}.{k}", v)
    return keys


def _normalize_shorthands(values: dict[str, Any], source: str) -> dict[str, Any]:
    values = copy.deepcopy(values)
    for dotted, field in _INT_SHORTHAND.items():
        section, key = dotted.split(".")
        parent = values.get(section)
        if isinstance(parent, dict) and isinstance(parent.get(key), int) and not isinstance(parent.get(key), bool):
            parent[key] = {field: parent[key]}
    return values


def _expected_types(dotted: str, default: Any) -> tuple[type, ...] | None:
    if dotted in _TYPES:
        return _TYPES[dotted]
    if default is None:
        return None  # untyped: anything goes
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, (list, tuple)):
        return (list, tuple)
    return (type(default),)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a pasted wall of text stays readable in an error)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def _check_type(dotted: str, default: Any, value: Any, source: str) -> Any:
    if value is None and (default is None or dotted in _TYPES):
        return value
    types = _expected_types(dotted, default)
    if types is None:
        return value
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(
            f"{source}: {dotted} expects {names} (default {default!r}), got {type(value).__name__} {_short(value)}"
        )
    if dotted not in _TYPES and isinstance(default, float) and not isinstance(value, bool) and isinstance(value, int):
        return float(value)  # lr=1 in a file means 1.0; keep the leaf's type stable
    return value


def _unknown(dotted: str, options: list[str], source: str) -> ConfigError:
    parent, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.5)
    where = f"section '{parent}'" if parent else "the top level"
    hint = f"; did you mean: {', '.join((parent + '.' if parent else '') + c for c in close)}?" if close else ""
    return ConfigError(f"{source}: unknown key '{dotted}' in {where}{hint} (valid keys: {', '.join(sorted(options))})")


def _merge(target: dict, values: dict, prefix: str, source: str, seen: dict[str, Any]) -> None:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in target:
            if not prefix and key[:1].isupper():
                target[key] = value  # InternEvo helper variables (SEQ_LEN, HIDDEN_SIZE, DO_ALERT, ...)
                continue
            raise _unknown(dotted, list(target), source)
        default = target[key]
        if isinstance(default, dict) and dotted not in _TYPES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} must be a dict of {sorted(default)}, got {value!r}")
            _merge(default, value, f"{dotted}.", source, seen)
            continue
        target[key] = _check_type(dotted, default, value, source)
        seen[dotted] = target[key]


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _put(cfg: dict, dotted: str, value: Any) -> None:
    *parents, key = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[key] = value


def _set(cfg: dict, dotted: str, value: Any, source: str) -> None:
    """Sets one override, checking the path and the type."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if not isinstance(node, dict) or part not in node:
            raise _unknown(here, list(node) if isinstance(node, dict) else [], source)
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {here} is a {type(node).__name__}, not a section")
    key = parts[-1]
    if not isinstance(node, dict) or key not in node:
        if len(parts) == 1 and key[:1].isupper():
            node[key] = value
            return
        raise _unknown(dotted, list(node), source)
    default = node[key]
    if isinstance(value, BareFlag):
        if bool not in (_expected_types(dotted, default) or ()):
            flag = "--noconfig" if not value.value else "--config"
            raise ConfigError(
                f"{flag}.{dotted}: no value given, and {dotted} is not a bool key (default {default!r}); give one: "
                f"--config.{dotted}=VALUE or --config.{dotted} VALUE"
            )
        value = value.value
    if dotted in _INT_SHORTHAND and isinstance(value, int) and not isinstance(value, bool):
        value = {_INT_SHORTHAND[dotted]: value}
    if isinstance(default, dict) and dotted not in _TYPES:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted} is a section; set its keys ({', '.join(sorted(default))})")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v, source)
        return
    node[key] = _check_type(dotted, default, value, source)


# ---------------------------------------------------------------------------------------------------------------------
# Derived values and cross-field checks
# ---------------------------------------------------------------------------------------------------------------------


def ffn_width(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternEvo's SwiGLU width: ``multiple_of * ceil(int(hidden * mlp_ratio) / multiple_of)`` (M-14)."""
    return multiple_of * math.ceil(int(hidden_size * mlp_ratio) / multiple_of)


def _finalize(cfg: dict, source: str, given: set[str] = frozenset(), cli: dict[str, str] | None = None) -> None:
    """Fills derived values and checks across fields; ``given``: the dotted keys the file or an override set;
    ``cli``: the keys overrides set, with the override (an error names it instead of the file)."""
    model, data, par, ckpt = cfg["model"], cfg["data"], cfg["parallel"], cfg["ckpt"]

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{_blame(msg, source, cli or {})}: {msg}")

    for key in ("seq_len", "micro_bsz"):
        need(data[key] is not None, f"data.{key} is required (InternEvo has no default for it)")
        need(data[key] > 0, f"data.{key} must be positive, got {data[key]}")
    need(data["micro_num"] >= 1, f"data.micro_num must be >= 1, got {data['micro_num']}")
    need(data["total_steps"] >= 1, f"data.total_steps must be >= 1, got {data['total_steps']}")
    need(
        data["gradient_accumulation"] == data["micro_num"],
        f"data.gradient_accumulation ({data['gradient_accumulation']}) must equal data.micro_num "
        f"({data['micro_num']}) without pipeline parallelism",
    )
    need(data["min_length"] >= 0, f"data.min_length must be >= 0, got {data['min_length']}")
    for key, value in (data["min_length_dict"] or {}).items():
        need(
            isinstance(key, str) and isinstance(value, int) and value >= 0,
            f"data.min_length_dict maps path substrings to token counts >= 0, got {key!r}: {value!r}",
        )
    # InternEvo ignores a user packed_length (with a warning); we say so and overwrite it the same way.
    data["packed_length"] = data["seq_len"] * data["micro_bsz"]
    types = ("tokenized", "dummy", "hf", "streaming")
    need(data["type"] in types, f"data.type={data['type']!r} is unknown; valid: {types}")
    if data["type"] in ("hf", "streaming"):
        need(
            data["train_folder"] is not None,
            f"data.type={data['type']!r} reads data.train_folder: set it to a Hugging Face dataset name or a local "
            "folder/file of .jsonl/.json/.parquet/.arrow files",
        )
        need(
            data["tokenizer_path"] is not None,
            f"data.type={data['type']!r} tokenizes on the fly: set data.tokenizer_path to a SentencePiece .model "
            "file or a Hugging Face tokenizer folder",
        )
        need(
            isinstance(data["content_name"], str) and data["content_name"] != "",
            f"data.content_name must name the text field of the records, got {data['content_name']!r}",
        )

    from internevo_jax.model import MODELS  # here, not at the top: model.py imports this module

    need(
        cfg["model_type"] in MODELS or not is_moe_model_type(cfg["model_type"]),
        f"model_type={cfg['model_type']!r}: mixture-of-experts (MoE) models are not implemented yet; dense model "
        f"types: {sorted(MODELS)}",
    )
    need(
        cfg["model_type"] in MODELS,
        f"model_type={cfg['model_type']!r} is unknown; registered: {sorted(MODELS)} (add yours with "
        "internevo_jax.register_model before loading the config)",
    )
    need(model["dtype"] in DTYPES, f"model.dtype={model['dtype']!r} is unknown; valid: {sorted(DTYPES)}")
    ckpt_frac = model["checkpoint"]
    model["checkpoint"] = float(ckpt_frac)
    need(
        0.0 <= model["checkpoint"] <= 1.0,
        f"model.checkpoint must be True/False or a fraction in [0, 1], got {ckpt_frac}",
    )
    _check_ranges(cfg, need)  # before anything divides by a size
    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    need(hidden % heads == 0, f"model.hidden_size {hidden} is not divisible by model.num_attention_heads {heads}")
    if model["num_kv_attention_heads"] is None:
        model["num_kv_attention_heads"] = heads
    kv = model["num_kv_attention_heads"]
    need(heads % kv == 0, f"model.num_attention_heads {heads} is not divisible by model.num_kv_attention_heads {kv}")
    need(
        (hidden // heads) % 2 == 0, f"head dim {hidden // heads} (hidden_size/num_attention_heads) must be even (RoPE)"
    )
    need(model["norm_type"] in ("rmsnorm", "layernorm"), f"model.norm_type={model['norm_type']!r}: rmsnorm | layernorm")
    need(model["attn_impl"] in ATTN_IMPLS, f"model.attn_impl={model['attn_impl']!r} is unknown; valid: {ATTN_IMPLS}")
    need(
        model["remat_policy"] in REMAT_POLICIES,
        f"model.remat_policy={model['remat_policy']!r} is unknown; valid: {REMAT_POLICIES}",
    )
    need(model["init_type"] in ("normal", "uniform"), f"model.init_type={model['init_type']!r}: normal | uniform")
    need(model["num_experts"] == 1, "model.num_experts > 1 (MoE) is not implemented yet")
    if model["no_bias"] is None:
        model["no_bias"] = cfg["model_type"] != "INTERNLM"
    _resolve_rope_layout(model, cfg["model_type"], need)
    _check_rope_scaling(model, need)
    for key in ("drop_rate", "attn_drop_rate"):
        need(0.0 <= model[key] < 1.0, f"model.{key} must be in [0, 1), got {model[key]}")
    need(
        not model["attn_drop_rate"] or model["attn_impl"] in ("xla", "auto"),
        f"model.attn_drop_rate > 0 needs model.attn_impl='xla' (got {model['attn_impl']!r})",
    )
    need(model["attn_max_segments"] >= 1, "model.attn_max_segments must be >= 1")
    need(
        model["rope_scaling_factor"] >= 1.0,
        f"model.rope_scaling_factor must be >= 1, got {model['rope_scaling_factor']}",
    )
    need(model["max_position_embeddings"] >= 1, "model.max_position_embeddings must be >= 1")
    std = 0.0052 if cfg["model_type"] == "INTERNLM" else 0.02
    for key in ("embedding_init_std", "out_head_init_std"):
        model[key] = std if model[key] is None else model[key]
    std = 0.006 if cfg["model_type"] == "INTERNLM" else 0.02
    for key in ("attn_wqkv_init_std", "attn_other_init_std", "ffn_uplayer_init_std", "ffn_other_init_std"):
        model[key] = std if model[key] is None else model[key]

    mode = par["tensor"].get("mode", "mtp")
    need(mode in TENSOR_MODES, f"parallel.tensor.mode={mode!r} is unknown; valid: {TENSOR_MODES}")
    par["sequence_parallel"] = mode in ("msp", "fsp", "isp")
    if par["zero1"]["size"] != -1 and par["zero1"]["size"] <= 0:
        par["zero1"]["size"] = 1  # InternEvo: 0 and other negatives mean "no ZeRO" (quirk 5.11)
    need(par["weight"]["size"] == 1 or mode == "isp", "parallel.weight.size > 1 needs parallel.tensor.mode='isp'")
    for key in ("tensor", "pipeline", "weight"):
        need(par[key]["size"] >= 1, f"parallel.{key}.size must be >= 1, got {par[key]['size']}")

    try:
        parse_skip_batches(data["skip_batches"])
    except ConfigError as e:
        need(False, str(e))
    need(cfg["loss"]["logits_chunk_size"] >= 0, "loss.logits_chunk_size must be >= 0 (0 = no chunking)")
    need(
        cfg["hybrid_zero_optimizer"]["max_consecutive_inf_nan"] >= 1,
        "hybrid_zero_optimizer.max_consecutive_inf_nan must be >= 1",
    )
    clip = cfg["hybrid_zero_optimizer"]["clip_grad_norm"]
    need(clip >= 0, f"hybrid_zero_optimizer.clip_grad_norm must be >= 0, got {clip}")
    need(0 <= cfg["lr_scheduler"]["warmup_ratio"] <= 1, "lr_scheduler.warmup_ratio must be in [0, 1]")
    need(cfg["lr_scheduler"]["total_steps"] >= 1, "lr_scheduler.total_steps must be >= 1")

    if ckpt["enable_save_ckpt"]:
        need(
            ckpt["save_ckpt_folder"] is not None,
            "ckpt.enable_save_ckpt=True needs ckpt.save_ckpt_folder (or set ckpt.enable_save_ckpt=False)",
        )
        need(
            ckpt["checkpoint_every"] is not None and ckpt["checkpoint_every"] > 0,
            f"ckpt.enable_save_ckpt=True needs ckpt.checkpoint_every > 0, got {ckpt['checkpoint_every']}",
        )
    elif ckpt["checkpoint_every"] is None:
        ckpt["checkpoint_every"] = INF
    _convert_legacy_load_keys(ckpt, need, source, info_given="ckpt.load_ckpt_info" in given)
    if ckpt["load_ckpt_info"] is not None:
        ckpt["load_ckpt_info"] = _check_load_ckpt_info(ckpt["load_ckpt_info"], need)
    if ckpt["max_to_keep"] is not None:
        need(ckpt["max_to_keep"] >= 1, f"ckpt.max_to_keep must be >= 1, got {ckpt['max_to_keep']}")
    freq = ckpt["oss_snapshot_freq"]
    need(
        freq == INF or (freq >= 0 and freq == int(freq)),
        f"ckpt.oss_snapshot_freq must be a whole number of steps (<= 1 or inf: no snapshots), got {freq}",
    )
    for key in ("save_ckpt_folder", "snapshot_ckpt_folder", "stop_file_path"):
        if ckpt[key] is not None:
            need(ckpt[key] != "", f"ckpt.{key} is empty; give a path or None")
            local_path(ckpt[key])  # an unsupported storage prefix fails now, not after compiling
    mon, alert = cfg["monitor"], cfg["monitor"]["alert"]
    formats = ("feishu", "json")
    need(alert["webhook_format"] in formats, f"monitor.alert.webhook_format={alert['webhook_format']!r}: {formats}")
    need(alert["loss_spike_ratio"] > 1, f"monitor.alert.loss_spike_ratio must be > 1, got {alert['loss_spike_ratio']}")
    need(alert["heartbeat_every"] >= 1, f"monitor.alert.heartbeat_every must be >= 1, got {alert['heartbeat_every']}")
    need(mon["hang_timeout_seconds"] >= 0, "monitor.hang_timeout_seconds must be >= 0 (0 turns the watchdog off)")
    need(mon["slow_step_ratio"] > 1, f"monitor.slow_step_ratio must be > 1, got {mon['slow_step_ratio']}")
    need(mon["profile_start_step"] >= 0, "monitor.profile_start_step must be >= 0")
    need(mon["profile_num_steps"] >= 1, "monitor.profile_num_steps must be >= 1")
    need(data["valid_every"] >= 0, f"data.valid_every must be >= 0 (0: no validation), got {data['valid_every']}")
    need(data["valid_micro_num"] >= 1, f"data.valid_micro_num must be >= 1, got {data['valid_micro_num']}")
    _check_generation(cfg["generation"], need)
    need(
        cfg["JOB_NAME"] != "" and "/" not in cfg["JOB_NAME"],
        f"JOB_NAME={cfg['JOB_NAME']!r} must be a non-empty name without '/'",
    )


# Numbers with an obvious range (checked as loaded, None skipped: a derived default fills it): "[" / "]" closed,
# "(" / ")" open. NaN is in no range; inf only where the interval says "inf]".
_RANGES = {
    "seed": "[0, 4294967296)",  # numpy's seed range (np.random.seed, RandomState)
    "batch_count": "[0, inf)",
    "model.vocab_size": "[1, inf)",
    "model.hidden_size": "[1, inf)",
    "model.num_layers": "[1, inf)",
    "model.num_attention_heads": "[1, inf)",
    "model.num_kv_attention_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)",
    "model.multiple_of": "[1, inf)",
    "model.num_chunks": "[1, inf)",
    "model.layer_norm_epsilon": "(0, inf)",
    "model.rope_base": "(0, inf)",
    "model.embed_grad_scale": "[0, 1]",
    "model.embedding_init_std": "[0, inf)",
    "model.attn_wqkv_init_std": "[0, inf)",
    "model.attn_other_init_std": "[0, inf)",
    "model.ffn_uplayer_init_std": "[0, inf)",
    "model.ffn_other_init_std": "[0, inf)",
    "model.out_head_init_std": "[0, inf)",
    "data.seq_len": "[1, inf)",
    "data.micro_bsz": "[1, inf)",
    "data.micro_num": "[1, inf)",
    "data.total_steps": "[1, inf)",
    "data.num_worker": "[0, inf)",
    "data.num_dummy_samples": "[1, inf)",
    "data.seed": "[0, 4294967296)",
    "adam.lr": "[0, inf)",
    "adam.adam_beta1": "[0, 1)",
    "adam.adam_beta2": "[0, 1)",
    "adam.adam_eps": "(0, inf)",
    "adam.weight_decay": "[0, inf)",
    "lr_scheduler.warmup_ratio": "[0, 1]",
    "lr_scheduler.eta_min": "[0, inf)",
    "lr_scheduler.init_steps": "[0, inf)",
    "lr_scheduler.total_steps": "[1, inf)",
    "beta2_scheduler.init_beta2": "[0, 1)",
    "grad_scaler.fp16.initial_scale": "(0, inf)",
    "grad_scaler.fp16.min_scale": "(0, inf)",
    "grad_scaler.fp16.growth_interval": "[1, inf)",
    "grad_scaler.growth_factor": "(1, inf)",  # InternEvo's DynamicGradScaler asserts these four
    "grad_scaler.backoff_factor": "(0, 1)",
    "grad_scaler.max_scale": "(0, inf)",
    "grad_scaler.hysteresis": "[1, inf)",
    "hybrid_zero_optimizer.clip_grad_norm": "[0, inf)",
    "loss.label_smoothing": "[0, 1)",
    "loss.moe_loss_coeff": "[0, inf)",
    "model.drop_rate": "[0, 1)",
    "model.attn_drop_rate": "[0, 1)",
}


def _in_interval(value: Any, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    low_ok = value >= lo if interval[0] == "[" else value > lo
    high_ok = value <= hi if interval[-1] == "]" else value < hi
    return bool(low_ok and high_ok)


def _check_ranges(cfg: dict, need: Any) -> None:
    """``_RANGES``, and a SwiGLU width of at least 1 (a tiny ``mlp_ratio`` rounds it to 0)."""
    for key, interval in _RANGES.items():
        value = _get(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        if interval.endswith("inf)"):
            lo = interval[1:].split(",")[0]
            bound = f"{'>=' if interval[0] == '[' else '>'} {lo}"
            bound += " and finite" if math.isinf(value) and value > 0 else ""
        else:
            bound = f"in {interval}"
        need(_in_interval(value, interval), f"{key} must be {bound}, got {value}")
    model = cfg["model"]
    width = ffn_width(model["hidden_size"], model["mlp_ratio"], model["multiple_of"])
    need(
        width >= 1,
        f"model.mlp_ratio {model['mlp_ratio']} gives a feed-forward width of {width} "
        f"(multiple_of * ceil(int(hidden_size {model['hidden_size']} * mlp_ratio) / multiple_of)); raise it",
    )


CKPT_TYPES = ("internevo", "hf", "hf_llama", "llama")
CKPT_CONTENTS = ("model", "sampler", "optimizer", "scheduler", "all")


def is_moe_model_type(model_type: str) -> bool:
    """InternEvo's mixture-of-experts model types (``INTERNLM_MoE``; later ``QWEN2MOE``, ``MIXTRALMOE``): InternEvo
    itself tests ``"MoE" in model_type``; any case here."""
    return "moe" in str(model_type).lower()


def _convert_legacy_load_keys(ckpt: dict, need: Any, source: str, info_given: bool) -> None:
    """InternEvo's legacy keys (CK-04) -> ``load_ckpt_info``: ``load_ckpt_folder`` loads (model, sampler, optimizer),
    or (model, sampler) with ``load_optimizer=False``; ``load_model_only_folder`` loads (model,);
    ``load_given_ckpt=True`` turns ``auto_resume`` off.

    The legacy keys are read only when ``load_ckpt_info`` is not given. InternEvo's ``7B_sft.py`` sets both, and
    InternEvo then uses ``load_ckpt_info`` and ignores the legacy key: so do we, saying so in one warning. A given
    ``load_ckpt_info=None`` means nothing to load here, and the legacy keys are ignored then too (InternEvo would
    fall back to them, which makes its own advice for a run from scratch, ``load_ckpt_info=None``, load the legacy
    folder of its ``7B_sft.py``).
    """
    full, model_only = ckpt["load_ckpt_folder"], ckpt["load_model_only_folder"]
    if full is not None or model_only is not None:
        if info_given or ckpt["load_ckpt_info"] is not None:
            legacy = " and ".join(
                f"ckpt.{key}={value!r}"
                for key, value in (("load_ckpt_folder", full), ("load_model_only_folder", model_only))
                if value is not None
            )
            info, as_internevo = ckpt["load_ckpt_info"], "as InternEvo ignores it beside load_ckpt_info"
            if info is None:
                why = f" to None (nothing to load), so the legacy {legacy} is ignored (InternEvo would load it)"
            elif "path" in info and info["path"] is None:
                why = f" with path=None (nothing to load), so the legacy {legacy} is ignored, {as_internevo}"
            else:
                why = f", so the legacy {legacy} is ignored, {as_internevo}"
            _warn(f"{source}: ckpt.load_ckpt_info is set{why}; remove the legacy key to silence this warning")
        else:
            need(
                full is None or model_only is None,
                "set one of ckpt.load_ckpt_folder (legacy) and ckpt.load_model_only_folder (legacy), or "
                "ckpt.load_ckpt_info instead of both",
            )
            content = ("model",) if full is None else ("model", "sampler") + (("optimizer",) * ckpt["load_optimizer"])
            ckpt["load_ckpt_info"] = dict(path=full or model_only, content=content, ckpt_type="internevo")
        # The resolved config says what is loaded in one place (and loads again as it is, without a warning).
        ckpt["load_ckpt_folder"] = ckpt["load_model_only_folder"] = None
    if ckpt["load_given_ckpt"]:
        ckpt["auto_resume"] = False


def _check_load_ckpt_info(info: dict, need: Any) -> dict | None:
    """Normalises ``ckpt.load_ckpt_info`` (CK-04): a path, a content tuple (lower case), a known ckpt_type.
    ``path=None`` (InternEvo's ``demo.py``) means nothing to load, the same as ``load_ckpt_info=None``."""
    unknown = sorted(set(info) - {"path", "content", "ckpt_type"})
    need(not unknown, f"ckpt.load_ckpt_info has unknown keys {unknown}; valid: path, content, ckpt_type")
    if "path" in info and info["path"] is None:
        return None
    need(isinstance(info.get("path"), str) and info["path"], "ckpt.load_ckpt_info needs path='local:/folder'")
    content = info.get("content", ("model",))
    content = (content,) if isinstance(content, str) else tuple(content)
    content = tuple(c.lower() for c in content)
    bad = [c for c in content if c not in CKPT_CONTENTS]
    need(not bad, f"ckpt.load_ckpt_info.content has {bad}; valid: {CKPT_CONTENTS}")
    kind = info.get("ckpt_type", "internevo")
    need(kind in CKPT_TYPES, f"ckpt.load_ckpt_info.ckpt_type={kind!r} is unknown; valid: {CKPT_TYPES}")
    if kind in ("hf", "hf_llama", "llama"):
        need(content == ("model",), f"ckpt_type={kind!r} holds model weights only: set content=('model',)")
    return dict(path=info["path"], content=content, ckpt_type=kind)


def _check_generation(gen: dict, need: Any) -> None:
    """The ``generation`` section (``tools/generate.py``, G-01..G-06): ranges, EOS ids, and no beam search yet."""
    need(
        gen["num_beams"] == 1,
        f"generation.num_beams={gen['num_beams']}: beam search is not implemented yet; set num_beams=1 "
        "(do_sample=False decodes greedily, do_sample=True samples)",
    )
    need(gen["batch_size"] >= 1, f"generation.batch_size must be >= 1, got {gen['batch_size']}")
    need(gen["max_length"] >= 2, f"generation.max_length (prompt included) must be >= 2, got {gen['max_length']}")
    need(
        gen["temperature"] > 0,
        f"generation.temperature must be > 0, got {gen['temperature']} (for greedy decoding set do_sample=False)",
    )
    need(gen["top_k"] >= 0, f"generation.top_k must be >= 0 (0: no top-k filter), got {gen['top_k']}")
    need(0 < gen["top_p"] <= 1, f"generation.top_p must be in (0, 1] (1: no top-p filter), got {gen['top_p']}")
    need(gen["repetition_penalty"] > 0, f"generation.repetition_penalty must be > 0, got {gen['repetition_penalty']}")
    for key in ("eos_id", "additional_eos_token_list"):
        value = gen[key]
        ids = [] if value is None else [value] if isinstance(value, int) else list(value)
        need(
            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids),
            f"generation.{key} must be a token id or a list of token ids (ints >= 0), got {value!r}",
        )


def _check_rope_scaling(model: dict, need: Any) -> None:
    """``model.rope_scaling_type`` and its keys (the math: ``model.RopeScaling``)."""
    kind = model["rope_scaling_type"]
    need(
        kind in (None, "linear", "llama3"),
        f"model.rope_scaling_type={kind!r} is not implemented; valid: None (plain RoPE, or dynamic NTK with "
        "model.use_dynamic_ntk_rope=True), 'linear', 'llama3'",
    )
    need(
        not (kind and model["use_dynamic_ntk_rope"]),
        f"model.rope_scaling_type={kind!r} and model.use_dynamic_ntk_rope=True are two RoPE scalings; set one",
    )
    low, high, original = (
        model[f"rope_{k}"] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    )
    need(
        0 < low < high,
        f"model.rope_low_freq_factor ({low}) and model.rope_high_freq_factor ({high}) need 0 < low < high",
    )
    need(
        original is None or (isinstance(original, int) and not isinstance(original, bool) and original >= 1),
        f"model.rope_original_max_position_embeddings must be None or an int >= 1, got {original!r}",
    )


def _resolve_rope_layout(model: dict, model_type: str, need: Any) -> None:
    """Fills ``adapt_hf`` and ``qk_interleaved`` (one switch under two names) from each other and the model type."""
    if model_type == "INTERNLM":  # InternLM1 has only the half-split layout; InternEvo ignores adapt_hf there
        need(not model["qk_interleaved"], "model.qk_interleaved=True: INTERNLM has only the half-split RoPE layout")
        model["adapt_hf"], model["qk_interleaved"] = True, False
        return
    adapt, inter = model["adapt_hf"], model["qk_interleaved"]
    if adapt is not None and inter is not None:
        need(
            adapt != inter,
            f"model.adapt_hf={adapt} and model.qk_interleaved={inter} contradict (qk_interleaved = not adapt_hf); "
            "set only one of them",
        )
    elif inter is not None:
        adapt = not inter
    elif adapt is None:
        adapt = model_type != "LLAMA2"
    model["adapt_hf"], model["qk_interleaved"] = bool(adapt), not adapt


def parse_skip_batches(spec: str) -> list[tuple[int, int]]:
    """InternEvo's ``data.skip_batches`` ``"a-b,c"`` -> sorted inclusive spans; they must increase without overlap."""
    spans: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
            raise ConfigError(
                f"data.skip_batches={spec!r}: {part!r} is not 'N' or 'A-B' (batch indices, e.g. '0-99,150')"
            )
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a or (spans and a <= spans[-1][1]):
            raise ConfigError(f"data.skip_batches={spec!r}: spans must be increasing and non-overlapping ({part!r})")
        spans.append((a, b))
    return spans


def batch_skipper(spec: str) -> Callable[[int], bool]:
    """``batch_count -> skip?`` for ``data.skip_batches`` (T-05)."""
    spans = parse_skip_batches(spec)
    return lambda batch: any(a <= batch <= b for a, b in spans)


def jax_dtype_name(model_cfg: ml_collections.ConfigDict) -> str:
    """The JAX compute dtype name for ``model.dtype`` (params stay fp32 masters)."""
    return DTYPES[model_cfg.dtype]


def local_path(path: str) -> str:
    """Strips InternEvo's ``local:`` prefix; other storage prefixes are not supported yet."""
    if path.startswith("local:"):
        return path[len("local:") :]
    for prefix in ("boto3:", "volc:", "oss2:", "s3:", "vc:", "ali:"):
        if path.startswith(prefix):
            raise ConfigError(f"checkpoint path {path!r}: storage prefix '{prefix}' is not supported yet (use local:)")
    return path


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (inf written as the string "inf", so the file stays valid JSON), secrets masked.

    Every copy of the config we write goes through here (the run's ``config.json``, the TensorBoard ``config`` text,
    each checkpoint's meta, ``--print_config``), so webhook and monitor addresses and URL credentials never reach a
    file in clear (``redaction.redact_config``: the rule the log lines use).
    """

    def enc(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: enc(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [enc(v) for v in value]
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value

    return json.dumps(enc(redact_config(config.to_dict())), indent=2, sort_keys=True)
