"""Llama-3-8B: the architecture of the published ``meta-llama/Meta-Llama-3-8B``.

Numbers: the HF ``config.json``; it runs as InternEvo's ``LLAMA2`` model type (same block, GQA).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.llama3_8b import *
"""

model_type = "LLAMA2"

VOCAB_SIZE = 128256
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 3.5  # ffn_width(4096, MLP_RATIO) = 14336
NUM_LAYER = 32

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    no_bias=True,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=500_000,
    dtype="torch.bfloat16",
)
