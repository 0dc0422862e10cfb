"""InternLM2-20B pretraining preset: the architecture of the published ``internlm/internlm2-20b``.

The architecture is ``configs/_base_/models/internlm2_20b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

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
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "internlm2_20b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)

# ZeRO over all data ranks with params and gradients split too (the docstring has the memory arithmetic).
parallel = dict(zero1=dict(size=-1, fsdp=True))
