"""Qwen2.5-0.5B: the architecture of the published ``Qwen/Qwen2.5-0.5B`` (model_type ``QWEN2``).

Numbers: the HF ``config.json``. The small Qwen2/2.5 sizes tie the head to the embedding table.
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.qwen2_5_0_5b import *
"""

model_type = "QWEN2"

VOCAB_SIZE = 151936
HIDDEN_SIZE = 896
NUM_ATTENTION_HEAD = 14
NUM_KV_ATTENTION_HEAD = 2
MLP_RATIO = 4864 / 896  # ffn_width(896, MLP_RATIO) = 4864
NUM_LAYER = 24

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-6,
    rope_base=1_000_000,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    dtype="torch.bfloat16",
)
