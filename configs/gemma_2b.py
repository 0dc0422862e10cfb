"""Gemma-2B fine-tuning/pretraining preset: the architecture of the published ``google/gemma-2b``.

The architecture is ``configs/_base_/models/gemma_2b.py`` (model_type ``GEMMA``, one configuration of the one
decoder; the README's model table says what the family differs in) and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``).

Numbers: the HF ``config.json``: h2048, 18 layers, 8 query heads / 1 KV head (MQA) of dim 256, FFN 16384 (GeGLU, tanh
GELU), vocab 256000, RMSNorm (1 + w) eps 1e-6, embeddings x sqrt(2048), tied head. 2,506,172,416 parameters, checked
by ``tests/test_presets.py``.

Start from the published weights (an HF folder, read by the HF import): uncomment ``load_ckpt_info`` below and set
the path. Layout: ZeRO-1 over all data ranks and full activation recompute (memory not measured for this size).
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/gemma_2b.py
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.gemma_2b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "gemma_2b"
ckpt = dict(
    ckpt,
    save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt",
    # load_ckpt_info=dict(path="local:/path/to/gemma-2b", content=("model",), ckpt_type="hf"),
)

# The base file's architecture; full recompute in every layer.
model = dict(model, checkpoint=True)
