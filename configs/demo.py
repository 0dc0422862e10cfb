"""CPU demo: a 3M-parameter InternLM2 on InternEvo's dummy data (learnable repeated integer ranges).

Layout: one device (data 1); any device count works, the extra devices become data parallel.
Expect the loss to fall from ~5.5 to well under 2 within the run, in about 1-2 minutes on 2 CPU cores:

    python launch.py --config=configs/demo.py

Written in InternEvo's style (module-level sections); see configs/7b_sft.py for a full-size example.
"""

JOB_NAME = "demo"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 256
HIDDEN_SIZE = 256
NUM_ATTENTION_HEAD = 8
NUM_KV_ATTENTION_HEAD = 4
MLP_RATIO = 3
NUM_LAYER = 4
VOCAB_SIZE = 256  # dummy tokens are < 200

data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,
    micro_bsz=2,
    total_steps=60,
    num_dummy_samples=20000,
    num_worker=2,
)

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    vocab_size=VOCAB_SIZE,
    rope_base=1_000_000,
    dtype="torch.float32",  # CPUs have no fast bf16 matmul; use "torch.bfloat16" on GPUs
    checkpoint=False,
)

adam = dict(lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.1, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="local:RUN/demo/ckpt",
    checkpoint_every=20,
    auto_resume=True,
)

parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))
