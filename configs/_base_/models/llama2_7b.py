"""Llama-2-7B: the architecture of the published ``meta-llama/Llama-2-7b-hf``.

Numbers: the HF ``config.json`` (InternEvo's ``configs/7B_llama2.py`` is a GQA demo, not Llama-2-7B).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.llama2_7b import *
"""

model_type = "LLAMA2"

VOCAB_SIZE = 32000
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
    no_bias=True,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=10000,
    dtype="torch.bfloat16",
)
