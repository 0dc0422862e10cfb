"""CPU demo on real text: a 1.5M-parameter InternLM2 learns Python from the standard library's own source code.

Two commands from the repository root. The first builds the data in seconds (a 2000-piece BPE tokenizer and
``RUN/demo_text_data/train/code/stdlib.bin``, ~4.5M tokens from ~800 files) and prints the unigram entropy of the
tokens, ~6.0 nats: the best loss without context. The second trains 400 steps of 2048 tokens; on 2 CPU cores it takes
~2.5 minutes and the loss ends near 3.9, two nats below that:

    python tools/make_demo_text.py
    python launch.py --config=configs/demo_text.py

Layout: one device (data 1); any device count works, the extra devices become data parallel. Another data folder:
``python tools/make_demo_text.py --output_dir DIR`` and ``--config.data.train_folder=DIR/train``.
"""

JOB_NAME = "demo_text"
model_type = "INTERNLM2_PUBLIC"

DATA_FOLDER = "RUN/demo_text_data"  # tools/make_demo_text.py --output_dir (its default)
SEQ_LEN = 256
HIDDEN_SIZE = 128
NUM_ATTENTION_HEAD = 4
NUM_KV_ATTENTION_HEAD = 2
MLP_RATIO = 3
NUM_LAYER = 4
VOCAB_SIZE = 2000  # tools/make_demo_text.py --vocab_size

data = dict(
    train_folder=f"{DATA_FOLDER}/train",
    seq_len=SEQ_LEN,
    # micro_bsz 1: attention runs over whole packed rows of micro_bsz * seq_len tokens, so on a CPU more tokens per
    # step are cheaper as micro-batches; 2048 tokens a step, ~0.4 s on 2 cores.
    micro_num=8,
    micro_bsz=1,
    total_steps=400,
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

adam = dict(lr=5e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="local:RUN/demo_text/ckpt",
    checkpoint_every=100,
    auto_resume=True,
)

parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))
