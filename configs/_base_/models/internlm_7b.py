"""InternLM-7B (v1): the architecture of the published ``internlm/internlm-7b``.

Numbers: InternEvo ``configs/_base_/models/internlm_7B.py`` and the HF ``config.json``; biases on q/k/v/o (InternEvo's
INTERNLM default) and RMSNorm eps 1e-6 (the HF checkpoint's; InternEvo's base writes 1e-5).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.internlm_7b import *
"""

model_type = "INTERNLM"

VOCAB_SIZE = 103168
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3  # ffn_width(4096, MLP_RATIO) = 11008
NUM_LAYER = 32

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    no_bias=False,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-6,
    rope_base=10000,
    dtype="torch.bfloat16",
)
