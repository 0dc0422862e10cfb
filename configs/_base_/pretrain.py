"""The training settings the pretraining presets share (configs/internlm2_7b.py and its siblings).

Only what differs from InternEvo's defaults (``internevo_jax/config/schema.py`` holds them all; configs/7b_sft.py is
a complete file in InternEvo's layout). A preset imports it after its model, then names its run and its checkpoint
folder and changes what differs for its size:

    with read_base():
        from configs._base_.models.internlm2_7b import *
        from configs._base_.pretrain import *

    JOB_NAME = "internlm2_7b"
    ckpt = dict(ckpt, save_ckpt_folder=f"local:RUN/{JOB_NAME}/ckpt")
"""

SEQ_LEN = 4096

ckpt = dict(
    enable_save_ckpt=True,
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

parallel = dict(
    # size -1: the ZeRO group is all data-parallel ranks; fsdp=True also splits params and grads over it.
    zero1=dict(size=-1, fsdp=False),
)
