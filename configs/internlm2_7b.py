"""InternLM2-7B pretraining preset: the architecture of the published ``internlm/internlm2-7b``.

The architecture is ``configs/_base_/models/internlm2_7b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

Numbers: InternEvo ``configs/_base_/models/internlm2_7B.py`` (M-14) and the HF ``config.json``:
h4096, 32 layers, 32 query / 8 KV heads (GQA), mlp_ratio 3.5 -> FFN 14336, vocab 92544, rope_base 1e6, no biases.
7,737,708,544 parameters, checked by ``tests/test_presets.py``.

Layout: one 8-GPU node, data 8, ZeRO-1 (Adam moments split over the data ranks, fp32 params replicated) and full
activation recompute. XLA's compile-time estimate is ~57 GiB per device (CPU compile of this step on 8 devices);
more nodes only grow the data axis. Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/internlm2_7b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/internlm2_7b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.internlm2_7b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "internlm2_7b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)
