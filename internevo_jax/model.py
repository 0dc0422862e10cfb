"""InternLM-family decoder (InternLM1, InternLM2, Llama as configurations of one module) in Flax NNX.

Shape glossary: B batch rows, T length, D model (hidden), N query heads, K kv heads, G = N / K query heads per kv head,
H head dim, F ffn width, V vocab, L layers.

Parameters are fp32 masters named like InternLM2 (``tok_embeddings``, ``layers.attention.wqkv``, ``attention.wo``,
``feed_forward.w1/w2/w3`` with w2 the down projection, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``).
Each carries logical axis names in its ``axes`` metadata; ``mesh.py`` maps them to devices. The layers are one
stacked ``Block`` (leading L dim) run under ``jax.lax.scan``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from internevo_jax.config import ffn_width, jax_dtype_name
from internevo_jax.mesh import constrain
from internevo_jax.ops.attention import attention


def _init(key: jax.Array, shape: tuple[int, ...], std: float, init_type: str) -> jax.Array:
    if init_type == "uniform":
        a = math.sqrt(3 * std)  # InternEvo's formula (M-10), not sqrt(3) * std; kept for parity
        return jax.random.uniform(key, shape, jnp.float32, -a, a)
    return std * jax.random.normal(key, shape, jnp.float32)


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm computed in fp32, returned in the compute dtype (M-12)."""

    def __init__(self, dim: int, cfg: ml_collections.ConfigDict, stack: tuple[int, ...] = ()):
        lead = ("layers",) * len(stack)
        self.rms = cfg.norm_type == "rmsnorm"
        self.eps = cfg.layer_norm_epsilon
        self.weight = _param(jnp.ones(stack + (dim,), jnp.float32), lead + ("norm",))
        if not self.rms:
            self.bias = _param(jnp.zeros(stack + (dim,), jnp.float32), lead + ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.rms:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps) * self.weight[...]
        else:
            h = h - h.mean(axis=-1, keepdims=True)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            h = h * self.weight[...] + self.bias[...]
        return h.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H/2] for half-split RoPE, built in fp32 and rounded to the activation dtype (M-12)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the two halves of the head dim (GPT-NeoX layout). x: [B, T, ..., H]; cos/sin: [B, T, H/2]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """GQA self-attention with a fused ``wqkv`` [D, K, G + 2, H]: per kv group ``[q_0..q_{G-1}, k, v]`` (M-04)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...], out_scale: jax.Array):
        d, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_attention_heads
        self.kv_heads, self.groups, self.head_dim = k, n // k, d // n
        self.attn_impl = cfg.attn_impl
        lead = ("layers",) * len(stack)
        qkv_shape = stack + (d, k, self.groups + 2, self.head_dim)
        self.wqkv = _param(
            _init(rngs.params(), qkv_shape, cfg.attn_wqkv_init_std, cfg.init_type),
            lead + ("embed", "kv_heads", "qkv", "head_dim"),
        )
        wo = _init(rngs.params(), stack + (n, self.head_dim, d), cfg.attn_other_init_std, cfg.init_type)
        self.wo = _param(wo * out_scale.reshape(stack + (1, 1, 1)), lead + ("heads", "head_dim", "embed"))
        self.bias = not cfg.no_bias
        if self.bias:
            self.bqkv = _param(
                jnp.zeros(qkv_shape[:-4] + qkv_shape[-3:], jnp.float32), lead + ("kv_heads", "qkv", "head_dim")
            )
            self.bo = _param(jnp.zeros(stack + (d,), jnp.float32), lead + ("norm",))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        dtype = x.dtype
        qkv = jnp.einsum("btd,dkch->btkch", x, self.wqkv[...].astype(dtype))  # c = G + 2 slots
        if self.bias:
            qkv = qkv + self.bqkv[...].astype(dtype)
        qkv = checkpoint_name(qkv, "qkv")
        g = self.groups
        q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]  # [B,T,K,G,H], [B,T,K,H], [B,T,K,H]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = checkpoint_name(attention(q, k, v, segment_ids, self.attn_impl), "attn_out")  # [B, T, K, G, H]
        b, t = x.shape[:2]
        out = out.reshape(b, t, self.kv_heads * g, self.head_dim)  # head n = kv * G + g
        y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dtype))
        if self.bias:
            y = y + self.bo[...].astype(dtype)
        return y


class FeedForward(nnx.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``; w2 is the down projection [F, D]."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...], out_scale: jax.Array):
        d, f = cfg.hidden_size, ffn_width(cfg.hidden_size, cfg.mlp_ratio, cfg.multiple_of)
        lead = ("layers",) * len(stack)
        up_std = cfg.ffn_uplayer_init_std
        self.w1 = _param(_init(rngs.params(), stack + (d, f), up_std, cfg.init_type), lead + ("embed", "mlp"))
        self.w3 = _param(_init(rngs.params(), stack + (d, f), up_std, cfg.init_type), lead + ("embed", "mlp"))
        w2 = _init(rngs.params(), stack + (f, d), cfg.ffn_other_init_std, cfg.init_type)
        self.w2 = _param(w2 * out_scale.reshape(stack + (1, 1)), lead + ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w1[...].astype(dtype))
        up = jnp.einsum("btd,df->btf", x, self.w3[...].astype(dtype))
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h, self.w2[...].astype(dtype))


class Block(nnx.Module):
    """One decoder layer (M-11); built with ``stack=(L,)`` it holds all L layers' params along a leading dim."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        num = stack[0] if stack else 1
        # Scaled init divides layer l's output projections by sqrt(2 (l + 1)) (M-10).
        scale = 1.0 / jnp.sqrt(2.0 * jnp.arange(1, num + 1)) if cfg.use_scaled_init else jnp.ones((num,))
        scale = scale if stack else scale[0]
        self.post_norm = cfg.apply_post_layer_norm
        self.attention_norm = Norm(cfg.hidden_size, cfg, stack)
        self.attention = Attention(cfg, rngs, stack, scale)
        self.ffn_norm = Norm(cfg.hidden_size, cfg, stack)
        self.feed_forward = FeedForward(cfg, rngs, stack, scale)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        if self.post_norm:
            x = self.attention_norm(x + self.attention(x, cos, sin, segment_ids))
            return self.ffn_norm(x + self.feed_forward(x))
        h = x + self.attention(self.attention_norm(x), cos, sin, segment_ids)
        out = h + self.feed_forward(self.ffn_norm(h))
        return constrain(out, ("act_batch", "act_length", "act_embed"))


def _grad_scaled(w: jax.Array, alpha: float) -> jax.Array:
    """Forward value unchanged, gradient multiplied by alpha (``embed_grad_scale``, M-09)."""
    if alpha == 1:
        return w
    return alpha * w + (1 - alpha) * jax.lax.stop_gradient(w)


_REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


class Decoder(nnx.Module):
    """Token ids -> fp32 logits. ``cfg`` is the ``model`` section (validated by ``config.load``)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        if cfg.drop_rate or cfg.attn_drop_rate:
            raise NotImplementedError("model.drop_rate / attn_drop_rate > 0 is not implemented yet (issue #3)")
        self.dtype = jnp.dtype(jax_dtype_name(cfg))
        self.num_layers = cfg.num_layers
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rope_base = cfg.rope_base
        self.embed_grad_scale = cfg.embed_grad_scale
        self.residual_fp32 = cfg.residual_in_fp32
        self.scan_layers = cfg.scan_layers
        # First ceil(L * checkpoint) layers recompute everything (InternEvo: lid < L * frac); the rest use remat_policy.
        self.num_full_remat = math.ceil(cfg.num_layers * cfg.checkpoint - 1e-9)
        self.remat_policy = cfg.remat_policy
        v, d = cfg.vocab_size, cfg.hidden_size
        self.tok_embeddings = _param(
            _init(rngs.params(), (v, d), cfg.embedding_init_std, cfg.init_type), ("vocab", "embed")
        )
        self.layers = Block(cfg, rngs, stack=(cfg.num_layers,))
        self.norm = None if cfg.apply_post_layer_norm else Norm(d, cfg)
        self.output = _param(_init(rngs.params(), (d, v), cfg.out_head_init_std, cfg.init_type), ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """tokens, positions, segment_ids: [B, T] int -> logits [B, T, V] fp32."""
        act = jnp.float32 if self.residual_fp32 else self.dtype
        table = _grad_scaled(self.tok_embeddings[...], self.embed_grad_scale)
        x = jnp.take(table, tokens, axis=0).astype(act)  # ids are range-checked on the host
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        cos, sin = rope_tables(positions, self.head_dim, self.rope_base, self.dtype)

        graphdef, stacked = nnx.split(self.layers)

        def layer(h: jax.Array, params: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, params)(h, cos, sin, segment_ids), None

        full = jax.checkpoint(layer, prevent_cse=False)
        policy = _REMAT_POLICIES[self.remat_policy]
        rest = layer if policy is None else jax.checkpoint(layer, policy=policy, prevent_cse=False)
        k = self.num_full_remat
        for body, lo, hi in ((full, 0, k), (rest, k, self.num_layers)):
            if hi <= lo:
                continue
            part = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], stacked)
            if self.scan_layers:
                x, _ = jax.lax.scan(body, x, part)
            else:
                for i in range(hi - lo):
                    x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], part))
        if self.norm is not None:
            x = self.norm(x)
        head = _grad_scaled(self.output[...], self.embed_grad_scale).astype(x.dtype)
        logits = jnp.einsum("btd,dv->btv", x, head).astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))


MODELS = {
    "INTERNLM": Decoder,
    "INTERNLM2_PUBLIC": Decoder,
    "INTERNLM2": Decoder,
    "LLAMA2": Decoder,
}


def build_model(model_type: str, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by ``model_type`` (the InternEvo registry key) from the ``model`` section."""
    if model_type not in MODELS:
        raise ValueError(f"model_type={model_type!r} is unknown; registered: {sorted(MODELS)}")
    return MODELS[model_type](cfg, rngs)
