"""InternLM3-8B fine-tuning/pretraining preset: the architecture of the published ``internlm/internlm3-8b-instruct``.

The architecture is ``configs/_base_/models/internlm3_8b.py`` (model_type ``INTERNLM3``, one configuration of the one
decoder; the README's model table says what the family differs in) and the training settings the presets share are
``configs/_base_/pretrain.py``, both imported InternEvo's way (``with read_base():``).

Numbers: the HF ``config.json``: h4096, 48 layers, 32 query / 2 KV heads (GQA), FFN 10240, vocab 128512, no biases,
rope_base 5e7 with dynamic NTK (factor 6) past 32768 positions, RMSNorm eps 1e-5. 8,804,241,408 parameters, checked by
``tests/test_presets.py``.

Start from the published weights (an HF folder, read by the HF import): uncomment ``load_ckpt_info`` below and set
the path. Layout: ZeRO-1 over all data ranks and full activation recompute (memory not measured for this size).
Launch on every host (dummy data until ``TRAIN_FOLDER`` is set):

    python launch.py --config=configs/internlm3_8b.py
"""

# ruff: noqa: F403, F405
from internevo_jax.config import read_base

with read_base():
    from configs._base_.models.internlm3_8b import *  # model_type, model (the architecture), its size helpers
    from configs._base_.pretrain import *  # the training settings the presets share

JOB_NAME = "internlm3_8b"
ckpt = dict(
    ckpt,
    save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt",
    # load_ckpt_info=dict(path="local:/path/to/internlm3-8b-instruct", content=("model",), ckpt_type="hf"),
)

# The base file's architecture; full recompute in every layer.
model = dict(model, checkpoint=True)
