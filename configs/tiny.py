"""Tiny InternLM2 (2 layers, d_model 64) for tests and smoke runs, in ml_collections ``get_config()`` style.

Layout: whatever devices are visible become data parallel. Command:

    python launch.py --config=configs/tiny.py --config.data.total_steps=20
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.JOB_NAME = "tiny"
    c.model_type = "INTERNLM2_PUBLIC"
    c.model = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_attention_heads=2,
        mlp_ratio=2,
        vocab_size=256,
        dtype="torch.float32",
    )
    c.data = dict(seq_len=32, micro_bsz=2, micro_num=2, total_steps=20, num_dummy_samples=4000, num_worker=1)
    c.adam = dict(lr=3e-3)
    c.lr_scheduler = dict(warmup_ratio=0.1, eta_min=1e-4)
    c.hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
    c.ckpt = dict(enable_save_ckpt=False)
    return c
