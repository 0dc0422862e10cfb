"""InternLM-7B (v1) pretraining preset: the architecture of the published ``internlm/internlm-7b``.

The architecture is ``configs/_base_/models/internlm_7b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

Numbers: InternEvo ``configs/7B_sft.py`` / ``_base_/models/internlm_7B.py`` (M-14) and the HF
``config.json``: h4096, 32 layers, 32 heads (MHA), mlp_ratio 8/3 -> FFN 11008, vocab 103168, rope_base 10000,
biases on q/k/v/o (``no_bias=False``, InternEvo's INTERNLM default), RMSNorm eps 1e-6 (the HF checkpoint's; InternEvo's
7B_sft writes 1e-5). 7,321,948,160 parameters, checked by ``tests/test_presets.py``.

Layout: one 8-GPU node, data 8, ZeRO-1 (Adam moments split over the data ranks, fp32 params replicated) and full
activation recompute. XLA's compile-time estimate is ~55 GiB per device (CPU compile of this step on 8 devices);
more nodes only grow the data axis. Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/internlm_7b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/internlm_7b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.internlm_7b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "internlm_7b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)
