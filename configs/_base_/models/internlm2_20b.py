"""InternLM2-20B: the architecture of the published ``internlm/internlm2-20b``.

Numbers: InternEvo ``configs/_base_/models/internlm2_20B.py`` and the HF ``config.json``.
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.internlm2_20b import *
"""

model_type = "INTERNLM2_PUBLIC"

VOCAB_SIZE = 92544
HIDDEN_SIZE = 6144
NUM_ATTENTION_HEAD = 48
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 8 / 3  # ffn_width(6144, MLP_RATIO) = 16384
NUM_LAYER = 48

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
    rope_base=1_000_000,
    dtype="torch.bfloat16",
)
