"""Baichuan2-7B fine-tuning/pretraining preset: the architecture of the published ``baichuan-inc/Baichuan2-7B-Base``.

The architecture is ``configs/_base_/models/baichuan2_7b.py`` (model_type ``BAICHUAN2``, one configuration of the one
decoder; the README's model table says what the family differs in) and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``).

Numbers: the HF ``config.json``: h4096, 32 layers, 32 heads (MHA; HF fuses q/k/v as W_pack), FFN 11008, vocab 125696,
no biases, rope_base 10000, RMSNorm eps 1e-6, NormHead (unit-norm vocab rows). 7,505,973,248 parameters, checked by
``tests/test_presets.py``.

Start from the published weights (an HF folder, read by the HF import): uncomment ``load_ckpt_info`` below and set
the path. Layout: ZeRO-1 over all data ranks and full activation recompute (memory not measured for this size).
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/baichuan2_7b.py
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.baichuan2_7b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "baichuan2_7b"
ckpt = dict(
    ckpt,
    save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt",
    # load_ckpt_info=dict(path="local:/path/to/Baichuan2-7B-Base", content=("model",), ckpt_type="hf"),
)

# The base file's architecture; full recompute in every layer.
model = dict(model, checkpoint=True)
