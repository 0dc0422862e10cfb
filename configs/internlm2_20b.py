"""InternLM2-20B pretraining preset: the architecture of the published ``internlm/internlm2-20b``.

The architecture is ``configs/_base_/models/internlm2_20b.py``, imported InternEvo's way (``with read_base():``);
this file adds the training settings.

Numbers: InternEvo ``configs/_base_/models/internlm2_20B.py`` (M-14) and the HF ``config.json``:
h6144, 48 layers, 48 query / 8 KV heads (GQA), mlp_ratio 8/3 -> FFN 16384, vocab 92544, rope_base 1e6, no biases.
19,861,149,696 parameters, checked by ``tests/test_presets.py``.

Layout: ZeRO over all data ranks with ``fsdp=True``, so params and gradients are split too: replicated fp32 params
alone would be 74 GiB per GPU (plain ZeRO-1 estimate: ~133 GiB per device). On one 8-GPU node XLA's compile-time
estimate is ~68 GiB per device (CPU compile of this step on 8 devices); two or more nodes leave more headroom.
InternEvo's own 20B config uses tensor parallelism (size 2) instead; that works here too
(``parallel.tensor.size=2`` equals one device in tests/test_parallel.py), but its GPU memory is not measured yet.
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    srun -p PART -N 2 -n 16 --ntasks-per-node=8 --gpus-per-task=1 python launch.py --config=configs/internlm2_20b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/internlm2_20b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.internlm2_20b import *  # model_type, model (the architecture), its size helpers

JOB_NAME = "internlm2_20b"
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
    zero1=dict(size=-1, fsdp=True),
)
