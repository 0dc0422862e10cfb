"""InternLM2-7B: the architecture of the published ``internlm/internlm2-7b``.

Numbers: InternEvo ``configs/_base_/models/internlm2_7B.py`` and the HF ``config.json``.
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.internlm2_7b import *
"""

model_type = "INTERNLM2_PUBLIC"

VOCAB_SIZE = 92544
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
    rope_base=1_000_000,
    dtype="torch.bfloat16",
)
