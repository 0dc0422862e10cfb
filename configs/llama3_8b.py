"""Llama-3-8B pretraining preset: the architecture of the published ``meta-llama/Meta-Llama-3-8B``.

The architecture is ``configs/_base_/models/llama3_8b.py`` and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``); this file names the run and
sets what differs for its size.

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
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "llama3_8b"
ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")
SEQ_LEN = 8192
data = dict(data, seq_len=SEQ_LEN, micro_num=2)

# The base file's architecture; full recompute in every layer: the XLA attention would otherwise keep
# [heads, T, T] fp32 scores for each one.
model = dict(model, checkpoint=True)

# ZeRO over all data ranks with params and gradients split too (the docstring has the memory arithmetic).
parallel = dict(zero1=dict(size=-1, fsdp=True))
