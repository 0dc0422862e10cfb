"""Llama-2-7B pretraining preset: the architecture of the published ``meta-llama/Llama-2-7b-hf``.

The architecture is ``configs/_base_/models/llama2_7b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

Numbers: the HF ``config.json`` (InternEvo's ``configs/7B_llama2.py`` is a GQA demo, not Llama-2-7B;
M-14): h4096, 32 layers, 32 heads (MHA), FFN 11008 (mlp_ratio 8/3), vocab 32000, RMSNorm eps 1e-5,
rope_base 10000, no biases. 6,738,415,616 parameters, checked by ``tests/test_presets.py``.

Layout: one 8-GPU node, data 8, ZeRO-1 (Adam moments split over the data ranks, fp32 params replicated) and full
activation recompute. XLA's compile-time estimate is ~50 GiB per device (CPU compile of this step on 8 devices);
more nodes only grow the data axis. Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/llama2_7b.py
    torchrun --nnodes=1 --nproc_per_node=8 launch.py --config=configs/llama2_7b.py --launcher torch
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.llama2_7b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "llama2_7b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)
