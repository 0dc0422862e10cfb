"""InternLM3-8B: the architecture of the published ``internlm/internlm3-8b-instruct`` (model_type ``INTERNLM3``).

Numbers: the HF ``config.json``. Its Hugging Face modelling is remote code (``modeling_internlm3.py``).
Architecture only (and the compute dtype); a config that imports it adds the training settings:

    with read_base():
        from configs._base_.models.internlm3_8b import *
"""

model_type = "INTERNLM3"

VOCAB_SIZE = 128512
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 2
MLP_RATIO = 2.5  # ffn_width(4096, MLP_RATIO) = 10240
NUM_LAYER = 48

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    vocab_size=VOCAB_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    mlp_ratio=MLP_RATIO,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=50_000_000,
    max_position_embeddings=32768,
    use_dynamic_ntk_rope=True,
    rope_scaling_factor=6.0,
    dtype="torch.bfloat16",
)
