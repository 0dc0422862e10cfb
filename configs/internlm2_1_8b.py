"""InternLM2-1.8B pretraining preset: the architecture of the published ``internlm/internlm2-1_8b``.

The architecture is ``configs/_base_/models/internlm2_1_8b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

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
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "internlm2_1_8b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)
