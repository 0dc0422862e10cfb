"""Gemma-7B: the architecture of the published ``google/gemma-7b`` (model_type ``GEMMA``).

Numbers: the HF ``config.json``. Gemma 2 is refused on import (see the README's model table).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.gemma_7b import *
"""

model_type = "GEMMA"

VOCAB_SIZE = 256000
HIDDEN_SIZE = 3072
NUM_ATTENTION_HEAD = 16
NUM_KV_ATTENTION_HEAD = 16
HEAD_DIM = 256  # independent of HIDDEN_SIZE / NUM_ATTENTION_HEAD (192)
MLP_RATIO = 8  # ffn_width(3072, MLP_RATIO) = 24576
NUM_LAYER = 28

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    head_dim=HEAD_DIM,
    layer_norm_epsilon=1e-6,
    rope_base=10000,
    max_position_embeddings=8192,
    dtype="torch.bfloat16",
)
