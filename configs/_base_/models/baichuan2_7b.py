"""Baichuan2-7B: the architecture of the published ``baichuan-inc/Baichuan2-7B-Base`` (model_type ``BAICHUAN2``).

Numbers: the HF ``config.json``. Its Hugging Face modelling is remote code (``modeling_baichuan.py``); Baichuan2-13B
uses ALiBi instead of RoPE and is refused.
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.baichuan2_7b import *
"""

model_type = "BAICHUAN2"

VOCAB_SIZE = 125696
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 32
MLP_RATIO = 11008 / 4096  # ffn_width(4096, MLP_RATIO) = 11008
NUM_LAYER = 32

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-6,
    rope_base=10000,
    max_position_embeddings=4096,
    dtype="torch.bfloat16",
)
