"""Llama-3-8B pretraining preset: the architecture of the published ``meta-llama/Meta-Llama-3-8B``.

The architecture is ``configs/_base_/models/llama3_8b.py``, imported InternEvo's way (``with read_base():``);
this file adds the training settings.

Numbers: the HF ``config.json``: h4096, 32 layers, 32 query / 8 KV heads (GQA), FFN 14336 (mlp_ratio 3.5),
vocab 128256, rope_base 500000, RMSNorm eps 1e-5, no biases, 8192-token context. 8,030,261,248 parameters,
checked by ``tests/test_presets.py``. It runs as InternEvo's ``LLAMA2`` model type (same block, GQA).

Layout: ZeRO over all data ranks with ``fsdp=True``, so params and gradients are split too: the 8192-token
sequences and the 128k vocab make the activations large (XLA's compile-time estimate on one 8-GPU node: ~59 GiB per
device with fsdp, ~85 GiB with plain ZeRO-1; CPU compile of this step on 8 devices). Full activation recompute.
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/llama3_8b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/llama3_8b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.llama3_8b import *  # model_type, model (the architecture), its size helpers

JOB_NAME = "llama3_8b"
SEQ_LEN = 8192

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
    micro_num=2,  # micro-batches per optimizer step (gradient accumulation)
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
    zero1=dict(size=-1, fsdp=True),
)
