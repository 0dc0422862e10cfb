"""Keys InternEvo has that would change the model or the run but are not implemented here: their InternEvo default
loads (so InternEvo's configs, which write the defaults out, keep working); any other value is refused naming the key,
the value and what is supported, instead of being accepted and silently ignored.

Not listed, because a value other than the default changes neither the model nor the numbers: performance and memory
knobs of InternEvo's PyTorch machinery (``hybrid_zero_optimizer.overlap_*``, ``use_split_tensor_optim``,
``parallel.weight.overlap``/``memory_pool``, ``parallel.pipeline.interleaved_overlap``, ``model.parallel_output``,
``model.dropout_selective_checkpoint``, ``data.use_shm``, ``cudnn_benchmark``, ``cudnn_deterministic``: cuDNN
convolution flags with nothing to act on in a transformer), keys InternEvo itself ignores (``alert_address``,
``batch_count``, ``metric_dtype``: our metrics are fp32 always), the MoE keys while ``num_experts`` is 1 (they act
only on a MoE model), and ``generation.data_folder``/``output_folder`` (the README's Generation section: prompts and
outputs are ``tools/generate.py``'s ``--prompts``/``--output``).
"""

from __future__ import annotations

from typing import Any

from internevo_jax.config.errors import Checker
from internevo_jax.config.merge import get

# key -> (the one supported value, what it would do in InternEvo, what to do instead)
UNSUPPORTED: dict[str, tuple[Any, str, str]] = {
    "model.use_swiglu": (
        True,
        "False selects a non-gated GELU MLP",
        "only the SwiGLU MLP (w2(silu(w1 x) * w3 x)) is implemented; remove the key or set it to True",
    ),
    "model.is_reward": (
        False,
        "True replaces the vocabulary head by a reward head (RewardModelLinear)",
        "reward models are not implemented; remove the key or set it to False",
    ),
    "lr_scheduler.last_epoch": (
        -1,
        "another value starts the lr schedule part-way",
        "a resumed run takes the schedule's position from its checkpoint (ckpt.auto_resume, or ckpt.load_ckpt_info "
        "with content 'scheduler'); lr_scheduler.init_steps offsets the schedule; set last_epoch=-1",
    ),
    "beta2_scheduler.cur_iter": (
        -1,
        "another value starts the beta2 schedule part-way",
        "a resumed run takes the schedule's position from its checkpoint (ckpt.auto_resume, or ckpt.load_ckpt_info "
        "with content 'scheduler'); set cur_iter=-1",
    ),
}


# Keys a model type reads itself: InternEvo v0.5's 7B_gemma.py sets use_swiglu=False for Gemma's GeGLU, which GEMMA's
# model.hidden_act='gelu_tanh' is.
EXEMPT: dict[str, set[str]] = {"model.use_swiglu": {"GEMMA"}}


def check_unsupported(cfg: dict, need: Checker) -> None:
    """Refuses a value other than the supported one of every ``UNSUPPORTED`` key."""
    for key, (supported, effect, fix) in UNSUPPORTED.items():
        if cfg["model_type"] in EXEMPT.get(key, ()):
            continue
        value = get(cfg, key)
        need(
            value == supported and type(value) is type(supported),
            f"{key}={value!r} is not implemented (supported: {key}={supported!r}; in InternEvo {effect}): {fix}",
        )
