"""Gemma-2B: the architecture of the published ``google/gemma-2b`` (model_type ``GEMMA``).

Numbers: the HF ``config.json``. Gemma 2 is refused on import (see the README's model table).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.gemma_2b import *
"""

model_type = "GEMMA"

VOCAB_SIZE = 256000
HIDDEN_SIZE = 2048
NUM_ATTENTION_HEAD = 8
NUM_KV_ATTENTION_HEAD = 1
HEAD_DIM = 256
MLP_RATIO = 8  # ffn_width(2048, MLP_RATIO) = 16384
NUM_LAYER = 18

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
