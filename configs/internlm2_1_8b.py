"""InternLM2-1.8B pretraining preset: the architecture of the published ``internlm/internlm2-1_8b``.

The architecture is ``configs/_base_/models/internlm2_1_8b.py``, imported InternEvo's way (``with read_base():``);
this file adds the training settings.

Numbers: InternEvo ``configs/_base_/models/internlm2_1B.py`` (M-14) and the HF ``config.json``:
h2048, 24 layers, 16 query / 8 KV heads (GQA), mlp_ratio 4 -> FFN 8192, vocab 92544, rope_base 1e6, no biases.
1,889,110,016 parameters, checked by ``tests/test_presets.py``.

Layout: one 8-GPU node, data 8, ZeRO-1 (Adam moments split over the data ranks). Attention is ``auto`` (the
default): a flash kernel on the GPU (cuDNN, else our Pallas kernel), so no [heads, 4096, 4096] scores are stored.
Full activation recompute is still on: it was needed with the XLA attention (~17 GiB per device with it, ~96 GiB
without, XLA's compile-time estimate on 8 CPU devices), and whether the flash kernels make it unnecessary (~50 GB by
arithmetic, within an H200) is measured by ``tools/gpu_check.py``'s train stage (docs/benchmarks.md) before it is
turned off here.
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/internlm2_1_8b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/internlm2_1_8b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.internlm2_1_8b import *  # model_type, model (the architecture), its size helpers

JOB_NAME = "internlm2_1_8b"
SEQ_LEN = 4096

# Only what differs from InternEvo's defaults (internevo_jax/config.py holds them all; configs/7b_sft.py is a
# complete file in InternEvo's layout).
ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt",
    checkpoint_every=1000,
    # Start from the published weights: load_ckpt_info=dict(path="local:/path/to/hf_folder", content=("model",),
    # ckpt_type="hf"). auto_resume (the default) still prefers this run's own newest checkpoint after a restart.
    load_ckpt_info=None,
    max_to_keep=2,
)

# A folder of InternEvo tokenized data (``<type>/*.bin`` + ``*.bin.meta``); None trains on InternEvo's dummy data.
TRAIN_FOLDER = None
data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,  # micro-batches per optimizer step (gradient accumulation)
    micro_bsz=1,  # packed_length = micro_bsz * SEQ_LEN tokens per micro-batch row
    total_steps=50000,
    min_length=50,
    train_folder=TRAIN_FOLDER,
)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
adam = dict(lr=0.0001, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01)
lr_scheduler = dict(total_steps=data["total_steps"], warmup_ratio=0.01, eta_min=1e-05)

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)

parallel = dict(
    # size -1: the ZeRO group is all data-parallel ranks; fsdp=True also splits params and grads over it.
    zero1=dict(size=-1, fsdp=False),
)
