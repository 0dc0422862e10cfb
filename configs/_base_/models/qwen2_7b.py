"""Qwen2-7B: the architecture of the published ``Qwen/Qwen2-7B`` (model_type ``QWEN2``).

Numbers: the HF ``config.json``. Qwen2.5-7B (``Qwen/Qwen2.5-7B``) has the same architecture and size.
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.qwen2_7b import *
"""

model_type = "QWEN2"

VOCAB_SIZE = 152064
HIDDEN_SIZE = 3584
NUM_ATTENTION_HEAD = 28
NUM_KV_ATTENTION_HEAD = 4
MLP_RATIO = 18944 / 3584  # ffn_width(3584, MLP_RATIO) = 18944
NUM_LAYER = 28

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
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    dtype="torch.bfloat16",
)
