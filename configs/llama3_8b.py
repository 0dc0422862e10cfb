"""Llama-3-8B pretraining preset: the architecture of the published ``meta-llama/Meta-Llama-3-8B``.

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

JOB_NAME = "llama3_8b"
model_type = "LLAMA2"
DO_ALERT = False

SEQ_LEN = 8192
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 3.5  # ffn_width(4096, MLP_RATIO) = 14336
NUM_LAYER = 32
VOCAB_SIZE = 128256

# Ckpt folder format: 'local:/mnt/nfs/XXX' (other storage prefixes are not supported yet).
SAVE_CKPT_FOLDER = f"local:RUN/{JOB_NAME}/ckpt"
CHECKPOINT_EVERY = 1000
ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    checkpoint_every=CHECKPOINT_EVERY,
    # auto_resume continues from the newest checkpoint in save_ckpt_folder, so a preempted job just restarts.
    auto_resume=True,
    # Starting from the published weights (load_ckpt_info=dict(path=..., content=("model",), ckpt_type="hf"))
    # lands with issue #7; until then this preset trains from scratch.
    load_ckpt_info=None,
    max_to_keep=2,  # one saved state is ~96 GB (fp32 params + two Adam moments)
)

# A folder of InternEvo tokenized data (``*.bin`` + ``*.bin.meta``, made with the Llama 3 tokenizer), e.g.
# TRAIN_FOLDER = "/path/to/tokenized/train"; support lands with issue #4. None trains on InternEvo's dummy data.
TRAIN_FOLDER = None
VALID_FOLDER = None
data = dict(
    seq_len=SEQ_LEN,
    # micro_num micro-batches per optimizer step (gradient accumulation).
    micro_num=2,
    # packed_length = micro_bsz * SEQ_LEN tokens per micro-batch row.
    micro_bsz=1,
    valid_micro_num=2,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=50000,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,  # drops samples shorter than 50 tokens
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(
    total_steps=data["total_steps"],
    init_steps=0,
    warmup_ratio=0.01,
    eta_min=1e-5,
    last_epoch=-1,
)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

use_fp32_norm = False
model = dict(
    # Full recompute in every layer: the XLA attention would otherwise keep [heads, T, T] fp32 scores for each one.
    checkpoint=True,
    num_chunks=1,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    no_bias=True,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=500_000,
    use_flash_attn=True,
)

parallel = dict(
    # size -1: the ZeRO group is all data-parallel ranks; fsdp=True also splits params and grads over it.
    zero1=dict(size=-1, fsdp=True),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True, memory_pool=True),
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
        alert_file_path=f"llm_alter/{JOB_NAME}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
