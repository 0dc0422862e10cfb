"""InternLM-family decoder (InternLM1, InternLM2, Llama as configurations of one module) in Flax NNX.

Shape glossary: B batch rows, T length, D model (hidden), N query heads, K kv heads, G = N / K query heads per kv head,
H head dim, F ffn width, V vocab, L layers, S KV-cache slots per row.

Parameters are fp32 masters named like InternLM2 (``tok_embeddings``, ``layers.attention.wqkv``, ``attention.wo``,
``feed_forward.w1/w2/w3`` with w2 the down projection, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``).
Each carries logical axis names in its ``axes`` metadata; ``mesh.py`` maps them to devices. The layers are one
stacked ``Block`` (leading L dim) run under ``jax.lax.scan``.

The families differ only in configuration: INTERNLM = MHA with qkv/out biases; INTERNLM2 = GQA, optionally with the
Meta-interleaved RoPE layout (``qk_interleaved``) and a normalised head (``norm_head``); LLAMA2 = GQA with the
interleaved layout by default; INTERNLM3 = GQA with dynamic NTK RoPE; QWEN2 = GQA with q/k/v biases but no output
bias (``qkv_bias``, ``o_bias``), often a tied head (``tie_word_embeddings``); GEMMA = RMSNorm scaling by ``1 + w``
(``add_unit_offset``), a GeGLU MLP (``hidden_act``), embeddings times sqrt(D) (``embed_scale``), a head dim of its
own (``head_dim``) and a tied head; BAICHUAN2 = MHA with a normalised head. Separate wq/wk/wv are stored fused here
(same function; ``convert/hf_layout.py`` splits them), so one attention einsum serves every family.

Generation (``generate.py``) runs the same modules with a ``KVCache`` threaded through ``Decoder.decode``: a prefill
attends like training and stores the keys/values, then each step attends one new token per row over the cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, overload

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from internevo_jax.config import MODEL_TYPES, ffn_width, jax_dtype_name
from internevo_jax.mesh import constrain
from internevo_jax.moe import MoE
from internevo_jax.ops.attention import attention, masked_attention


def _init(key: jax.Array, shape: tuple[int, ...], std: float, init_type: str) -> jax.Array:
    if init_type == "uniform":
        a = math.sqrt(3 * std)  # InternEvo's formula (M-10), not sqrt(3) * std; kept for parity
        return jax.random.uniform(key, shape, jnp.float32, -a, a)
    return std * jax.random.normal(key, shape, jnp.float32)


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm computed in fp32, returned in the compute dtype (M-12).

    Without ``use_fp32_norm`` InternEvo keeps the norm weight in the model dtype, so the weight is rounded to it
    before the fp32 multiply; with it the fp32 master is used as is.
    """

    def __init__(self, dim: int, cfg: ml_collections.ConfigDict, stack: tuple[int, ...] = ()):
        lead = ("layers",) * len(stack)
        self.rms = cfg.norm_type == "rmsnorm"
        self.eps = cfg.layer_norm_epsilon
        self.weight_dtype = jnp.float32 if cfg.use_fp32_norm else jnp.dtype(jax_dtype_name(cfg))
        # Gemma stores w and scales by (1 + w), in fp32 after rounding w to the model dtype as here; w starts at 0.
        self.offset = 1.0 if cfg.add_unit_offset else 0.0
        self.weight = _param(jnp.full(stack + (dim,), 1.0 - self.offset, jnp.float32), lead + ("norm",))
        if not self.rms:
            self.bias = _param(jnp.zeros(stack + (dim,), jnp.float32), lead + ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        weight = self.weight[...].astype(self.weight_dtype).astype(jnp.float32) + self.offset
        if self.rms:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps) * weight
        else:
            h = h - h.mean(axis=-1, keepdims=True)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            h = h * weight + self.bias[...].astype(self.weight_dtype).astype(jnp.float32)
        return h.astype(x.dtype)


def dynamic_ntk_base(positions: jax.Array, base: float, head_dim: int, max_pos: int, a: float) -> jax.Array:
    """RoPE base per row [B, 1], NTK-scaled when the row reaches past ``max_position_embeddings`` (M-08).

    ``seqlen`` is the row's largest position plus one, as Hugging Face's dynamic rope computes it for a sequence
    (it takes the max over the whole batch; per row, a row's result does not depend on its batch neighbours):
    ``base * (a * seqlen / max_pos - (a - 1)) ** (H / (H - 2))``. positions: [B, T].
    """
    seqlen = (jnp.max(positions, axis=-1, keepdims=True) + 1).astype(jnp.float32)
    scaled = base * (a * seqlen / max_pos - (a - 1)) ** (head_dim / (head_dim - 2))
    return jnp.where(seqlen > max_pos, scaled, base)


class RopeScaling(NamedTuple):
    """A static rescaling of the RoPE frequencies (Hugging Face's ``rope_scaling``, ``model.rope_scaling_type``).

    ``linear`` (position interpolation) divides every frequency by ``factor``. ``llama3`` (Llama 3.1/3.2) divides
    the low frequencies, wavelength > ``original_max_position_embeddings / low_freq_factor``, by ``factor``, keeps
    the high ones, wavelength < ``original_max_position_embeddings / high_freq_factor``, and blends the ones between
    linearly in ``original / wavelength``. Both leave the attention scale alone. Dynamic NTK is not one of these: it
    changes the base per row with the length (``dynamic_ntk_base``).
    """

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> RopeScaling | None:
        """The ``model`` section's scaling, or None for plain RoPE (and dynamic NTK)."""
        if not cfg.rope_scaling_type:
            return None
        original = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
        return cls(
            cfg.rope_scaling_type,
            float(cfg.rope_scaling_factor),
            float(cfg.rope_low_freq_factor),
            float(cfg.rope_high_freq_factor),
            int(original),
        )

    def apply(self, inv_freq: jax.Array) -> jax.Array:
        """Scaled inverse frequencies [..., H/2] (fp32), with Hugging Face's float32 operations in its order (its
        ``scalar / tensor`` is ``reciprocal(tensor) * scalar``), so the tables match it to the last bit or so."""
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind != "llama3":
            raise ValueError(f"RoPE scaling {self.kind!r}: linear | llama3")
        old, low, high = self.original_max_position_embeddings, self.low_freq_factor, self.high_freq_factor
        low_freq_wavelen, high_freq_wavelen = old / low, old / high
        wavelen = (1.0 / inv_freq) * (2 * math.pi)
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = ((1.0 / wavelen) * old - low) / (high - low)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return jnp.where(medium, smoothed, scaled)


def rope_tables(
    positions: jax.Array,
    head_dim: int,
    base: jax.Array | float,
    dtype: jnp.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H/2], built in fp32 and rounded to the activation dtype (M-12). ``base``: a float or [B, 1];
    ``scaling`` rescales the frequencies (``RopeScaling``)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.asarray(base, jnp.float32)[..., None] ** exponents)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotates channel pairs of the head dim. x: [B, T, ..., H]; cos/sin: [B, T, H/2].

    Half-split (GPT-NeoX / Hugging Face) pairs channel i with i + H/2. Interleaved (GPT-J / Meta, InternEvo's
    ``adapt_hf=False``) pairs 2i with 2i + 1, which is the half-split rotation of the ``[even..., odd...]`` reordered
    channels that InternEvo computes; the attention scores are identical, the stored weights are not.
    """
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    if interleaved:
        pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (evaluation) or the rate is 0."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding (``generate.py``): slot s of a row holds its token at position s.

    ``k``, ``v``: [L, B, S, K, H] in the activation dtype, keys already rotated (RoPE is applied once, when a token
    is written). ``start``: None for a prefill, which fills slots ``[0, T)`` of an empty cache and attends as
    training does (segment ids mask the padding after short prompts, so the attention kernels serve it); else [B],
    the slot where each row's incoming tokens go: token t of row b is written to slot ``start[b] + t`` and sees the
    slots up to its own. Slots past a row's own are never seen, so a row never reads another row's length or
    padding, and a prompt's result does not depend on its batch neighbours.
    """

    k: jax.Array
    v: jax.Array
    start: jax.Array | None = None  # (not "index": a NamedTuple field of that name would hide tuple.index)

    def write(self, layer: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Stores one layer's new keys/values [B, T, K, H]."""
        k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
        if self.start is None:
            corner = (layer, 0, 0, 0, 0)
            return self._replace(
                k=jax.lax.dynamic_update_slice(self.k, k[None], corner),
                v=jax.lax.dynamic_update_slice(self.v, v[None], corner),
            )
        rows = jnp.arange(k.shape[0])[:, None]
        slots = self.start[:, None] + jnp.arange(k.shape[1])  # [B, T]
        return self._replace(k=self.k.at[layer, rows, slots].set(k), v=self.v.at[layer, rows, slots].set(v))

    def attend(self, layer: jax.Array, q: jax.Array) -> jax.Array:
        """Queries [B, T, K, G, H] at slots ``start + t`` over the layer's cache -> [B, T, K, G, H]; fp32 softmax."""
        if self.start is None:
            raise ValueError("KVCache.attend decodes after a prefill: the cache needs start slots [B]")
        keys, values = self.k[layer], self.v[layer]  # [B, S, K, H]
        slots = self.start[:, None] + jnp.arange(q.shape[1])  # [B, T]
        visible = jnp.arange(keys.shape[1]) <= slots[..., None]  # [B, T, S]
        return masked_attention(q, keys, values, visible)


class Attention(nnx.Module):
    """GQA self-attention with a fused ``wqkv`` [D, K, G + 2, H]: per kv group ``[q_0..q_{G-1}, k, v]`` (M-04)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...], out_scale: jax.Array):
        d, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_attention_heads
        self.kv_heads, self.groups, self.head_dim = k, n // k, cfg.head_dim
        # InternEvo's use_flash_attn=False means plain attention; it turns the default auto into xla.
        self.attn_impl = cfg.attn_impl if cfg.use_flash_attn or cfg.attn_impl != "auto" else "xla"
        self.attn_drop_rate = cfg.attn_drop_rate
        self.max_segments = cfg.attn_max_segments
        self.interleaved = cfg.qk_interleaved
        lead = ("layers",) * len(stack)
        qkv_shape = stack + (d, k, self.groups + 2, self.head_dim)
        self.wqkv = _param(
            _init(rngs.params(), qkv_shape, cfg.attn_wqkv_init_std, cfg.init_type),
            lead + ("embed", "kv_heads", "qkv", "head_dim"),
        )
        wo = _init(rngs.params(), stack + (n, self.head_dim, d), cfg.attn_other_init_std, cfg.init_type)
        self.wo = _param(wo * out_scale.reshape(stack + (1, 1, 1)), lead + ("heads", "head_dim", "embed"))
        self.qkv_bias, self.bias = cfg.qkv_bias, cfg.o_bias  # Qwen2: q/k/v biases without the output's
        if self.qkv_bias:
            self.bqkv = _param(
                jnp.zeros(qkv_shape[:-4] + qkv_shape[-3:], jnp.float32), lead + ("kv_heads", "qkv", "head_dim")
            )
        if self.bias:
            self.bo = _param(jnp.zeros(stack + (d,), jnp.float32), lead + ("norm",))

    @overload
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, key: jax.Array | None = None
    ) -> jax.Array: ...
    @overload
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        key: jax.Array | None,
        cache: tuple[KVCache, jax.Array],
    ) -> tuple[jax.Array, KVCache]: ...
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        key: jax.Array | None = None,
        cache: tuple[KVCache, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """x [B, T, D] -> [B, T, D]; with ``cache=(kv_cache, layer)`` also the cache with this layer's keys written."""
        dtype = x.dtype
        qkv = jnp.einsum("btd,dkch->btkch", x, self.wqkv[...].astype(dtype))  # c = G + 2 slots
        if self.qkv_bias:
            qkv = qkv + self.bqkv[...].astype(dtype)
        # Attention sees whole rows with heads split: a no-op for mtp, the all-gather of msp/fsp, Ulysses' all-to-all
        # for isp (the rules table decides; the model only names the dims).
        qkv = checkpoint_name(constrain(qkv, ("act_batch", None, "act_heads", None, None)), "qkv")
        g = self.groups
        q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]  # [B,T,K,G,H], [B,T,K,H], [B,T,K,H]
        q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        drop = None if key is None or not self.attn_drop_rate else (self.attn_drop_rate, key)
        if cache is not None:
            kv, layer = cache
            kv = kv.write(layer, k, v)
        if cache is None or kv.start is None:  # training, evaluation, prefill: the tokens see each other only
            out = attention(q, k, v, segment_ids, self.attn_impl, drop, self.max_segments)  # [B, T, K, G, H]
        else:
            out = kv.attend(layer, q)
        out = checkpoint_name(out, "attn_out")
        out = constrain(out, ("act_batch", None, "act_heads", None, None))
        b, t = x.shape[:2]
        out = out.reshape(b, t, self.kv_heads * g, self.head_dim)  # head n = kv * G + g
        y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dtype))
        if self.bias:
            y = y + self.bo[...].astype(dtype)
        return y if cache is None else (y, kv)


# model.hidden_act -> the gate's activation; gelu_tanh is torch's gelu(approximate="tanh") (HF gelu_pytorch_tanh)
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class FeedForward(nnx.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)`` (GeGLU with Gemma's tanh-approximate GELU); w2 is the down projection [F, D]."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...], out_scale: jax.Array):
        d, f = cfg.hidden_size, ffn_width(cfg.hidden_size, cfg.mlp_ratio, cfg.multiple_of)
        lead = ("layers",) * len(stack)
        up_std = cfg.ffn_uplayer_init_std
        self.w1 = _param(_init(rngs.params(), stack + (d, f), up_std, cfg.init_type), lead + ("embed", "mlp"))
        self.w3 = _param(_init(rngs.params(), stack + (d, f), up_std, cfg.init_type), lead + ("embed", "mlp"))
        w2 = _init(rngs.params(), stack + (f, d), cfg.ffn_other_init_std, cfg.init_type)
        self.w2 = _param(w2 * out_scale.reshape(stack + (1, 1)), lead + ("mlp", "embed"))
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w1[...].astype(dtype))
        up = jnp.einsum("btd,df->btf", x, self.w3[...].astype(dtype))
        h = constrain(self.act(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h, self.w2[...].astype(dtype))


class Block(nnx.Module):
    """One decoder layer (M-11); built with ``stack=(L,)`` it holds all L layers' params along a leading dim."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        num = stack[0] if stack else 1
        # Scaled init divides layer l's output projections by sqrt(2 (l + 1)) (M-10).
        scale = 1.0 / jnp.sqrt(2.0 * jnp.arange(1, num + 1)) if cfg.use_scaled_init else jnp.ones((num,))
        scale = scale if stack else scale[0]
        self.post_norm = cfg.apply_post_layer_norm
        self.drop_rate = cfg.drop_rate
        self.attention_norm = Norm(cfg.hidden_size, cfg, stack)
        self.attention = Attention(cfg, rngs, stack, scale)
        self.ffn_norm = Norm(cfg.hidden_size, cfg, stack)
        # With num_experts > 1 the MLP slot holds the mixture of experts (moe.py); it also returns its aux loss.
        self.moe = cfg.num_experts > 1
        self.feed_forward: MoE | FeedForward = (
            MoE(cfg, rngs, stack, scale, _init) if self.moe else FeedForward(cfg, rngs, stack, scale)
        )

    @overload
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]: ...
    @overload
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        key: jax.Array | None,
        cache: tuple[KVCache, jax.Array],
    ) -> tuple[jax.Array, KVCache]: ...
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        key: jax.Array | None = None,
        cache: tuple[KVCache, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, KVCache]:
        """``key`` (None in evaluation) drives residual and attention dropout (and MoE routing noise). Returns
        ``(out, moe aux loss)``, or ``(out, cache)`` with ``cache=(kv_cache, layer)`` (decoding)."""
        k_in, k_attn, k_mid = (None,) * 3 if key is None else jax.random.split(key, 3)
        aux = jnp.zeros((), jnp.float32)

        def mlp(h: jax.Array) -> jax.Array:
            nonlocal aux
            if isinstance(self.feed_forward, FeedForward):  # (self.moe is False)
                return self.feed_forward(h)
            y, aux = self.feed_forward(h, None if k_mid is None else jax.random.fold_in(k_mid, 1))
            return y

        rate = self.drop_rate
        # InternEvo's pre-norm block (M-11): dropout1 acts on the whole incoming stream, dropout2 on the attention
        # output; post-norm drops the attention output with the first key.
        r = x if self.post_norm else _dropout(x, rate, k_in)
        a_in = r if self.post_norm else self.attention_norm(r)
        kv: KVCache | None = None  # the cache with this layer written (decoding)
        if cache is None:
            a = self.attention(a_in, cos, sin, segment_ids, k_attn)
        else:
            a, kv = self.attention(a_in, cos, sin, segment_ids, k_attn, cache)
        if self.post_norm:
            x = self.attention_norm(x + _dropout(a, rate, k_in))
            out = self.ffn_norm(x + _dropout(mlp(x), rate, k_mid))
        else:
            h = _dropout(a, rate, k_mid) + r
            out = constrain(h + mlp(self.ffn_norm(h)), ("act_batch", "act_length", "act_embed"))
        return (out, aux) if kv is None else (out, kv)


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
        self.rope_base = float(cfg.rope_base)
        self.ntk = (cfg.max_position_embeddings, cfg.rope_scaling_factor) if cfg.use_dynamic_ntk_rope else None
        self.rope_scaling = RopeScaling.from_config(cfg)
        self.dtype = jnp.dtype(jax_dtype_name(cfg))
        # torch.float32 means true fp32 matmuls; torch.tf32 (and the half types) take the backend's fast default.
        self.precision = "highest" if cfg.dtype == "torch.float32" else None
        self.num_layers = cfg.num_layers
        self.head_dim = cfg.head_dim
        self.norm_head = cfg.norm_head
        self.tied = cfg.tie_word_embeddings
        # Gemma: x sqrt(D), with sqrt(D) rounded to the activation dtype as HF does (bf16: 55.5 for D = 3072)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.embed_scale else None
        self.embed_grad_scale = cfg.embed_grad_scale
        self.residual_fp32 = cfg.residual_in_fp32
        self.scan_layers = cfg.scan_layers
        # The first ceil(n * checkpoint) layers of each stack of n layers recompute everything (InternEvo: lid < n *
        # frac, per pipeline chunk under pipeline parallelism); the rest use remat_policy.
        self.checkpoint = cfg.checkpoint
        self.remat_policy = cfg.remat_policy
        v, d = cfg.vocab_size, cfg.hidden_size
        self.tok_embeddings = _param(
            _init(rngs.params(), (v, d), cfg.embedding_init_std, cfg.init_type), ("vocab", "embed")
        )
        self.layers = Block(cfg, rngs, stack=(cfg.num_layers,))
        self.norm = None if cfg.apply_post_layer_norm else Norm(d, cfg)
        if not self.tied:  # a tied head is tok_embeddings^T (head_weight)
            self.output = _param(_init(rngs.params(), (d, v), cfg.out_head_init_std, cfg.init_type), ("embed", "vocab"))

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """tokens, positions, segment_ids: [B, T] int -> logits [B, T, V] fp32.

        ``dropout_key`` turns on ``drop_rate``/``attn_drop_rate`` dropout (training); None is evaluation.
        """
        with self.matmul_precision():
            return logits(self.features(tokens, positions, segment_ids, dropout_key), self.head_weight())

    def matmul_precision(self) -> contextlib.AbstractContextManager:
        """The matmul precision ``model.dtype`` asks for; wrap any use of ``features``/``head_weight`` in it."""
        return jax.default_matmul_precision(self.precision) if self.precision else contextlib.nullcontext()

    def head_weight(self) -> jax.Array:
        """The effective output head [D, V] in the compute dtype (gradient-scaled, normalised with ``norm_head``)."""
        head = _grad_scaled(self.tok_embeddings[...].T if self.tied else self.output[...], self.embed_grad_scale)
        if self.norm_head:  # unit L2 norm per vocab entry (M-07), F.normalize's eps
            head = head / jnp.maximum(jnp.linalg.norm(head, axis=0, keepdims=True), 1e-12)
        return head.astype(jnp.float32 if self.residual_fp32 else self.dtype)

    def features(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """The final hidden states [B, T, D] that the head turns into logits (the loss may do that in chunks).

        ``embed`` -> ``run_layers`` over the whole stack -> ``final_norm``; the pipeline (``pipeline.py``) runs the
        same pieces with the stack cut into stages.
        """
        return self.features_and_moe_loss(tokens, positions, segment_ids, dropout_key)[0]

    def features_and_moe_loss(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``features`` and the MoE aux loss summed over the layers (0 for a dense model; not yet scaled by
        ``loss.moe_loss_coeff``). ``dropout_key`` also drives MoE routing noise; None is evaluation."""
        x = self.embed(tokens)
        cos, sin = self.rope(positions)
        keys = self.layer_keys(dropout_key)
        x, aux = self.run_layers_and_moe_loss(x, nnx.state(self.layers), cos, sin, segment_ids, keys)
        return self.final_norm(x), aux

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty ``KVCache`` of ``length`` slots per row for ``batch`` rows (zeros, the activation dtype)."""
        k = self.layers.attention.kv_heads
        shape = (self.num_layers, batch, length, k, self.head_dim)
        dtype = jnp.float32 if self.residual_fp32 else self.dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def decode(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """``features`` with a ``KVCache``: the final hidden states [B, T, D] of ``tokens`` and the cache holding
        their keys and values too (a prefill when ``cache.start`` is None, else the next tokens of each row).

        RoPE follows ``positions`` (per-row dynamic NTK: a decoded token's query and key are rotated with the base
        for its row's length so far, while the cached keys keep the rotation they were written with, as Hugging
        Face's dynamic rope does with its cache). No dropout: this is inference.
        """
        x = self.embed(tokens)
        cos, sin = self.rope(positions)
        x, cache = self.run_layers(x, nnx.state(self.layers), cos, sin, segment_ids, None, cache)
        return self.final_norm(x), cache

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, T] -> the residual stream [B, T, D] in the activation dtype."""
        act = jnp.float32 if self.residual_fp32 else self.dtype
        table = _grad_scaled(self.tok_embeddings[...], self.embed_grad_scale)
        x = jnp.take(table, tokens, axis=0).astype(act)  # ids are range-checked on the host
        if self.embed_scale is not None:
            x = x * jnp.asarray(self.embed_scale, act)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RoPE cos/sin [B, T, H/2] for every layer (the dynamic-NTK base is each row's, so pass whole rows; linear and
        llama3 scaling are the same for every row)."""
        base = (
            self.rope_base
            if self.ntk is None
            else dynamic_ntk_base(positions, self.rope_base, self.head_dim, *self.ntk)
        )
        return rope_tables(positions, self.head_dim, base, self.dtype, self.rope_scaling)

    @overload
    def layer_keys(self, dropout_key: jax.Array) -> jax.Array: ...
    @overload
    def layer_keys(self, dropout_key: None) -> None: ...
    def layer_keys(self, dropout_key: jax.Array | None) -> jax.Array | None:
        """One dropout key per layer [L] (None in evaluation); they ride along the scanned params, so remat
        recomputes the same masks."""
        return None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)

    def run_layers(
        self,
        x: jax.Array,
        stack: nnx.State,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        keys: jax.Array | None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Runs consecutive layers: ``stack`` is ``self.layers``' state, or a slice of it along the leading layer dim
        (a pipeline chunk), with ``keys`` the matching per-layer dropout keys (or None). x: [B, T, D].

        With a ``cache`` (the whole stack, decoding) returns ``(x, cache)``: the cache rides in the scan carry, so
        each layer writes only its new slots in place instead of copying its whole buffer.
        """
        if cache is not None:
            return self.run_layers_and_moe_loss(x, stack, cos, sin, segment_ids, keys, cache)
        return self.run_layers_and_moe_loss(x, stack, cos, sin, segment_ids, keys)[0]

    def run_layers_and_moe_loss(
        self,
        x: jax.Array,
        stack: nnx.State,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: jax.Array,
        keys: jax.Array | None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, Any]:
        """``run_layers`` returning ``(x, cache)`` with a cache, else ``(x, MoE aux loss summed over the layers)``."""
        graphdef = nnx.graphdef(self.layers)
        n = jax.tree.leaves(stack)[0].shape[0]
        if cache is not None:  # no gradients here, so no remat

            def cached(carry: tuple[jax.Array, KVCache], xs: tuple[nnx.State, jax.Array]) -> tuple[Any, None]:
                h, kv = carry
                params, layer = xs
                return nnx.merge(graphdef, params)(h, cos, sin, segment_ids, cache=(kv, layer)), None

            (x, written), _ = jax.lax.scan(cached, (x, cache), (stack, jnp.arange(n)))
            return x, written

        def layer(h: jax.Array, xs: tuple[nnx.State, jax.Array | None]) -> tuple[jax.Array, jax.Array]:
            params, key = xs
            return nnx.merge(graphdef, params)(h, cos, sin, segment_ids, key)

        full = jax.checkpoint(layer, prevent_cse=False)
        policy = _REMAT_POLICIES[self.remat_policy]
        rest = layer if policy is None else jax.checkpoint(layer, policy=policy, prevent_cse=False)
        k = math.ceil(n * self.checkpoint - 1e-9)
        total = jnp.zeros((), jnp.float32)
        for body, lo, hi in ((full, 0, k), (rest, k, n)):
            if hi <= lo:
                continue
            part = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (stack, keys))
            if self.scan_layers:
                x, aux = jax.lax.scan(body, x, part)
                total = total + jnp.sum(aux)
            else:
                for i in range(hi - lo):
                    x, aux = body(x, jax.tree.map(lambda a, i=i: a[i], part))
                    total = total + aux
        return x, total

    def final_norm(self, x: jax.Array) -> jax.Array:
        """The norm after the last layer (none with post-layer norm). x: [..., D]."""
        return x if self.norm is None else self.norm(x)


def logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """[B, T, D] x [D, V] -> fp32 logits [B, T, V], computed in the activation dtype then upcast (M-12)."""
    out = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype)).astype(jnp.float32)
    return constrain(out, ("act_batch", "act_length", "act_vocab"))


class LanguageModel(Protocol):
    """What the Trainer calls on any model of ``register_model``; ``Decoder`` has it (pipeline parallelism and
    generation also use ``Decoder``'s other pieces)."""

    def matmul_precision(self) -> contextlib.AbstractContextManager: ...

    def features(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array: ...

    def head_weight(self) -> jax.Array: ...


# InternEvo's dense model types are one decoder; the config knows their names (config.MODEL_TYPES) without this dict.
MODELS: dict[str, Callable[..., nnx.Module]] = dict.fromkeys(sorted(MODEL_TYPES), Decoder)


def register_model(name: str, builder: Callable[..., nnx.Module] | None = None) -> Any:
    """Registers ``builder(model_cfg, rngs) -> nnx.Module`` as ``model_type=name`` (InternEvo's registry, one dict).

    Use it as ``register_model("MY_MODEL", MyModel)`` or as a decorator ``@register_model("MY_MODEL")``, before
    the config is loaded. The Trainer needs ``features(tokens, positions, segment_ids, dropout_key) -> [B, T, D]``,
    ``head_weight() -> [D, V]`` and ``matmul_precision()`` (see ``Decoder``), and params carrying logical ``axes``
    names from ``mesh.rules`` (every parallel mode whose names the model uses then works); pipeline parallelism
    also needs ``Decoder``'s ``embed``/``rope``/``layer_keys``/``run_layers``/``final_norm`` pieces, and generation
    its ``init_cache``/``decode``.
    """

    def add(b: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
        if MODELS.get(name, b) is not b:
            raise ValueError(f"model_type {name!r} is already registered to {MODELS[name]!r}; pick another name")
        MODELS[name] = b
        MODEL_TYPES.add(name)  # a config naming it now loads
        return b

    return add if builder is None else add(builder)


def build_model(model_type: str, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by ``model_type`` (the InternEvo registry key) from the ``model`` section."""
    if model_type not in MODELS:
        raise ValueError(f"model_type={model_type!r} is unknown; registered: {sorted(MODELS)}")
    return MODELS[model_type](cfg, rngs)
