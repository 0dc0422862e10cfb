"""Weight layouts: our params <-> Hugging Face folders (``config.json`` + ``*.safetensors``), a table of reshapes.

Ours (glossary of ``model.py``): ``wqkv`` [L, D, K, G + 2, H] with per-kv-group slots ``[q_0..q_{G-1}, k, v]``,
``wo`` [L, N, H, D], ``w1``/``w3`` [L, D, F] (gate/up), ``w2`` [L, F, D] (down), ``tok_embeddings`` [V, D],
``output`` [D, V]. HF stores ``nn.Linear`` weights as [out, in].

HF layouts read: ``LlamaForCausalLM`` (also InternLM1's ``InternLMForCausalLM``, which is Llama with q/k/v/o biases)
and ``InternLM2ForCausalLM`` (fused ``wqkv`` rows grouped per kv head exactly like ours). Both use the half-split
RoPE layout; a model configured with ``qk_interleaved`` (InternEvo's ``adapt_hf=False``, Meta layout) gets its q and
k channels permuted on the way in and back on the way out. Export writes the Llama layout, which
``transformers.AutoModelForCausalLM`` loads without ``trust_remote_code``, or the InternLM2 layout on request.

InternEvo's FFN names are a known hazard (reference §1.4): some converters call the down projection ``w3``. The down
projection is therefore identified by its shape [D, F], not by its name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from internevo_jax.config import ConfigError, ffn_width

LLAMA, INTERNLM1, INTERNLM2 = "LlamaForCausalLM", "InternLMForCausalLM", "InternLM2ForCausalLM"
ARCHITECTURES = (LLAMA, INTERNLM1, INTERNLM2)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed from the config


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def hf_config(model: ml_collections.ConfigDict, layout: str = "llama", dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of the equivalent HF model (``layout``: llama | internlm2)."""
    if model.norm_type != "rmsnorm" or model.apply_post_layer_norm:
        raise ValueError("only pre-norm RMSNorm models have a Hugging Face layout (norm_type / apply_post_layer_norm)")
    common = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=ffn_width(model.hidden_size, model.mlp_ratio, model.multiple_of),
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_kv_attention_heads,
        rms_norm_eps=model.layer_norm_epsilon,
        rope_theta=float(model.rope_base),
        max_position_embeddings=model.max_position_embeddings,
        rope_scaling=(
            dict(type="dynamic", rope_type="dynamic", factor=float(model.rope_scaling_factor))
            if model.use_dynamic_ntk_rope
            else None
        ),
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype=dtype,
    )
    if layout == "internlm2":
        return dict(architectures=[INTERNLM2], model_type="internlm2", bias=not model.no_bias, **common)
    if layout != "llama":
        raise ValueError(f"layout={layout!r}: llama | internlm2")
    return dict(
        architectures=[LLAMA],
        model_type="llama",
        head_dim=model.hidden_size // model.num_attention_heads,
        attention_bias=not model.no_bias,
        mlp_bias=False,
        **common,
    )


def _rope_theta(hf: Mapping[str, Any]) -> float:
    for holder in (hf, hf.get("rope_parameters") or {}, hf.get("rotary") or {}):
        for key in ("rope_theta", "base"):
            if key in holder:
                return float(holder[key])
    return 10000.0


def _dynamic_factor(hf: Mapping[str, Any]) -> float | None:
    """The dynamic-NTK factor of an HF config, or None when it uses plain RoPE."""
    for holder in (hf.get("rope_scaling"), hf.get("rope_parameters"), hf.get("rotary")):
        if holder and (holder.get("rope_type") or holder.get("type")) == "dynamic":
            return float(holder.get("factor", holder.get("scaling_factor", 1.0)))
    return None


def model_overrides(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model_type, model-section values)`` that make our model compute the HF model's function."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"HF architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}")
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(f"HF head_dim {head_dim} x {heads} heads != hidden_size {hidden}; not supported")
    ratio, multiple = inter / hidden, 256 if inter % 256 == 0 else 1
    if ffn_width(hidden, ratio, multiple) != inter:
        ratio = (inter + 0.5) / hidden  # int(hidden * ratio) lands exactly on inter
    bias = hf.get("attention_bias", hf.get("bias", arch == INTERNLM1))
    factor = _dynamic_factor(hf)
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_attention_heads=hf.get("num_key_value_heads") or heads,
        mlp_ratio=ratio,
        multiple_of=multiple,
        norm_type="rmsnorm",
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=_rope_theta(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        use_dynamic_ntk_rope=factor is not None,
        rope_scaling_factor=1.0 if factor is None else factor,
        no_bias=not bias,
        apply_post_layer_norm=False,
    )
    model_type = {LLAMA: "LLAMA2", INTERNLM1: "INTERNLM", INTERNLM2: "INTERNLM2_PUBLIC"}[arch]
    return model_type, values


def check_config(
    hf: Mapping[str, Any], model: ml_collections.ConfigDict, where: str, what: str = "the Hugging Face checkpoint"
) -> None:
    """Raises ``ConfigError`` naming every ``model.*`` key that disagrees with the HF ``config.json``.

    ``what`` names the checkpoint in the message (``torch_ckpt`` checks Meta's ``params.json`` as an HF dict)."""
    _, wanted = model_overrides(hf)
    bad, fix = [], []
    for key, value in wanted.items():
        ours = model[key]
        if key == "multiple_of" or (key == "rope_scaling_factor" and not model.use_dynamic_ntk_rope):
            continue
        keys = (key,)
        if key == "mlp_ratio":  # compare what the ratio means, the FFN width
            keys = ("mlp_ratio", "multiple_of")
            key, value, ours = (
                "ffn width",
                hf["intermediate_size"],
                ffn_width(model.hidden_size, ours, model.multiple_of),
            )
        same = math.isclose(ours, value, rel_tol=1e-9) if isinstance(value, float) else ours == value
        if not same:
            bad.append(f"model.{key}={ours!r} but {where} has {value!r}")
            fix += [f"--config.model.{k}={wanted[k]!r}" for k in keys]
    if bad:
        raise ConfigError(
            f"the config and {what} disagree:\n  "
            + "\n  ".join(bad)
            + f"\nfix the config, or override: {' '.join(fix)}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# RoPE channel layouts
# ---------------------------------------------------------------------------------------------------------------------


def _to_interleaved(x: np.ndarray) -> np.ndarray:
    """Half-split channels [c_0..c_{H/2-1}, s_0..] -> interleaved pairs [c_0, s_0, c_1, s_1, ...] on the last axis."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _to_half_split(x: np.ndarray) -> np.ndarray:
    """Inverse of ``_to_interleaved``: InternEvo's ``[even..., odd...]`` reorder (HF-02 ``permute``)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _qk_layout(qkv: np.ndarray, groups: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Applies a channel permutation to the q and k slots of ``[..., G + 2, H]``; v is untouched."""
    out = qkv.copy()
    out[..., : groups + 1, :] = fn(qkv[..., : groups + 1, :])
    return out


def rope_layout(qkv: np.ndarray, groups: int, interleaved: bool) -> np.ndarray:
    """A copy of fused ``[..., G + 2, H]`` q/k/v weights with q and k channels in the Meta-interleaved layout
    (``interleaved``) or the half-split one, from the other layout."""
    return _qk_layout(qkv, groups, _to_interleaved if interleaved else _to_half_split)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def to_hf(params: Mapping[str, Any], model: ml_collections.ConfigDict, layout: str = "llama") -> dict[str, np.ndarray]:
    """Our pure-dict params -> an HF state dict of numpy arrays (same dtype), Llama or InternLM2 names."""
    n, k = model.num_attention_heads, model.num_kv_attention_heads
    g, hd, d = n // k, model.hidden_size // n, model.hidden_size
    layers = params["layers"]
    attn, ff = layers["attention"], layers["feed_forward"]
    head = np.asarray(params["output"])  # [D, V]
    if model.norm_head:  # the function the model computes uses the normalised head (M-07, HF-02)
        norm = np.linalg.norm(head.astype(np.float32), axis=0, keepdims=True)
        head = (head / np.maximum(norm, 1e-12)).astype(head.dtype)
    internlm2 = layout == "internlm2"
    prefix = "model."
    out = {
        prefix + ("tok_embeddings" if internlm2 else "embed_tokens") + ".weight": np.asarray(params["tok_embeddings"]),
        prefix + "norm.weight": np.asarray(params["norm"]["weight"]),
        ("output" if internlm2 else "lm_head") + ".weight": head.T,
    }
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        wqkv = np.asarray(attn["wqkv"][i])  # [D, K, G + 2, H]
        bqkv = None if model.no_bias else np.asarray(attn["bqkv"][i])  # [K, G + 2, H]
        if model.qk_interleaved:
            wqkv = _qk_layout(wqkv, g, _to_half_split)
            bqkv = None if bqkv is None else _qk_layout(bqkv, g, _to_half_split)
        wo = np.asarray(attn["wo"][i]).reshape(n * hd, d).T
        if internlm2:
            out[p + "attention.wqkv.weight"] = wqkv.reshape(d, -1).T
            out[p + "attention.wo.weight"] = wo
            if bqkv is not None:
                out[p + "attention.wqkv.bias"] = bqkv.reshape(-1)
                out[p + "attention.wo.bias"] = np.asarray(attn["bo"][i])
            names = ("feed_forward.w1", "feed_forward.w3", "feed_forward.w2", "attention_norm", "ffn_norm")
        else:
            # Head n = kv * G + g, the grouping HF's repeat_kv uses.
            out[p + "self_attn.q_proj.weight"] = wqkv[:, :, :g].reshape(d, n * hd).T
            out[p + "self_attn.k_proj.weight"] = wqkv[:, :, g].reshape(d, k * hd).T
            out[p + "self_attn.v_proj.weight"] = wqkv[:, :, g + 1].reshape(d, k * hd).T
            out[p + "self_attn.o_proj.weight"] = wo
            if bqkv is not None:
                out[p + "self_attn.q_proj.bias"] = bqkv[:, :g].reshape(n * hd)
                out[p + "self_attn.k_proj.bias"] = bqkv[:, g].reshape(k * hd)
                out[p + "self_attn.v_proj.bias"] = bqkv[:, g + 1].reshape(k * hd)
                out[p + "self_attn.o_proj.bias"] = np.asarray(attn["bo"][i])
            names = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
        gate, up, down, norm1, norm2 = names
        out[p + gate + ".weight"] = np.asarray(ff["w1"][i]).T
        out[p + up + ".weight"] = np.asarray(ff["w3"][i]).T
        out[p + down + ".weight"] = np.asarray(ff["w2"][i]).T
        out[p + norm1 + ".weight"] = np.asarray(layers["attention_norm"]["weight"][i])
        out[p + norm2 + ".weight"] = np.asarray(layers["ffn_norm"]["weight"][i])
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def save_hf(
    params: Mapping[str, Any],
    model: ml_collections.ConfigDict,
    folder: str | os.PathLike,
    layout: str = "llama",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes ``config.json`` + ``model[-k-of-n].safetensors`` (+ index when sharded) into ``folder``.

    Files are written into a temporary sibling folder and renamed into place, so an interrupted export leaves
    either nothing or a complete folder. ``dtype`` (e.g. "bfloat16") casts on the way out; None keeps the params'.
    """
    import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy for the cast below)
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder for the export")
    tensors = to_hf(params, model, layout)
    if dtype is not None:
        tensors = {name: a.astype(np.dtype(dtype)) for name, a in tensors.items()}
    dtype_name = str(next(iter(tensors.values())).dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = dict(
            metadata=dict(total_size=sum(a.nbytes for a in tensors.values())),
            weight_map={name: file for file, shard in zip(files, shards, strict=True) for name in shard},
        )
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config(model, layout, dtype_name), indent=2))
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------------


class HFFolder:
    """Lazy reader of an HF checkpoint folder: ``config`` plus tensors by name from one or many safetensors files."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise ConfigError(f"{self.folder}: no config.json; is this a Hugging Face model folder?")
        self.config = json.loads(config.read_text())
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.folder / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            self.files = None
        else:
            found = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {found[:3]}: convert them to safetensors first)" if found else ""
            raise ConfigError(f"{self.folder}: no model.safetensors or model.safetensors.index.json{hint}")
        self._open: dict[Path, Any] = {}
        self.read: set[str] = set()  # names handed out, so leftovers can be reported
        if self.files is None:
            self.files = {
                name: self.folder / "model.safetensors"
                for name in self._handle(self.folder / "model.safetensors").keys()
            }

    def _handle(self, path: Path) -> Any:
        from safetensors import safe_open

        if path not in self._open:
            if not path.is_file():
                raise ConfigError(f"{path}: listed in the index but missing")
            self._open[path] = safe_open(str(path), framework="numpy")
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ConfigError(f"{self.folder}: tensor {name!r} is missing")
        self.read.add(name)
        return self._handle(self.files[name]).get_tensor(name)


def _expect(folder: HFFolder, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = folder.get(name)
    if tuple(a.shape) != tuple(shape):
        raise ConfigError(
            f"{folder.folder}: tensor {name!r} has shape {tuple(a.shape)}, the config expects {tuple(shape)}"
        )
    return a


def _layer_tensors(folder: HFFolder, arch: str, i: int, m: ml_collections.ConfigDict) -> Iterator[tuple[str, Any]]:
    """Yields ``(our leaf name, one layer's array in our layout)`` for layer ``i``."""
    n, k, d = m.num_attention_heads, m.num_kv_attention_heads, m.hidden_size
    g, hd = n // k, d // n
    f = ffn_width(d, m.mlp_ratio, m.multiple_of)
    p = f"model.layers.{i}."
    bias = not m.no_bias
    if arch == INTERNLM2:
        wqkv = _expect(folder, p + "attention.wqkv.weight", (k * (g + 2) * hd, d)).T.reshape(d, k, g + 2, hd)
        bqkv = _expect(folder, p + "attention.wqkv.bias", (k * (g + 2) * hd,)).reshape(k, g + 2, hd) if bias else None
        wo = _expect(folder, p + "attention.wo.weight", (d, n * hd))
        bo = _expect(folder, p + "attention.wo.bias", (d,)) if bias else None
        gate = _expect(folder, p + "feed_forward.w1.weight", (f, d))
        second, third = folder.get(p + "feed_forward.w2.weight"), folder.get(p + "feed_forward.w3.weight")
        # The down projection is [D, F] in HF's [out, in]; trust the shape over the name (w2/w3 hazard).
        down, up = (third, second) if f != d and tuple(third.shape) == (d, f) else (second, third)
        down = _check(folder, p + "feed_forward.w2 (down)", down, (d, f))
        up = _check(folder, p + "feed_forward.w3 (up)", up, (f, d))
        norm1, norm2 = p + "attention_norm.weight", p + "ffn_norm.weight"
    else:
        q = _expect(folder, p + "self_attn.q_proj.weight", (n * hd, d)).T.reshape(d, k, g, hd)
        kk = _expect(folder, p + "self_attn.k_proj.weight", (k * hd, d)).T.reshape(d, k, 1, hd)
        v = _expect(folder, p + "self_attn.v_proj.weight", (k * hd, d)).T.reshape(d, k, 1, hd)
        wqkv = np.concatenate([q, kk, v], axis=2)
        bqkv = None
        if bias:
            bq = _expect(folder, p + "self_attn.q_proj.bias", (n * hd,)).reshape(k, g, hd)
            bk = _expect(folder, p + "self_attn.k_proj.bias", (k * hd,)).reshape(k, 1, hd)
            bv = _expect(folder, p + "self_attn.v_proj.bias", (k * hd,)).reshape(k, 1, hd)
            bqkv = np.concatenate([bq, bk, bv], axis=1)
        wo = _expect(folder, p + "self_attn.o_proj.weight", (d, n * hd))
        bo = _expect(folder, p + "self_attn.o_proj.bias", (d,)) if bias else None
        gate = _expect(folder, p + "mlp.gate_proj.weight", (f, d))
        up = _expect(folder, p + "mlp.up_proj.weight", (f, d))
        down = _expect(folder, p + "mlp.down_proj.weight", (d, f))
        norm1, norm2 = p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
    if m.qk_interleaved:
        wqkv = _qk_layout(wqkv, g, _to_interleaved)
        bqkv = None if bqkv is None else _qk_layout(bqkv, g, _to_interleaved)
    yield "attention.wqkv", wqkv
    yield "attention.wo", wo.T.reshape(n, hd, d)
    if bias:
        yield "attention.bqkv", bqkv
        yield "attention.bo", bo
    yield "feed_forward.w1", gate.T
    yield "feed_forward.w3", up.T
    yield "feed_forward.w2", down.T
    yield "attention_norm.weight", _expect(folder, norm1, (d,))
    yield "ffn_norm.weight", _expect(folder, norm2, (d,))


def _check(folder: HFFolder, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(a.shape) != shape:
        raise ConfigError(f"{folder.folder}: tensor {name!r} has shape {tuple(a.shape)}, the config expects {shape}")
    return a


def load_hf(folder: str | os.PathLike, model: ml_collections.ConfigDict) -> dict[str, Any]:
    """An HF folder -> our pure-dict params (numpy, the checkpoint's dtype), checked against the ``model`` section.

    Every mismatch is an error naming the config key or tensor and both values; unexpected tensors (another
    architecture's weights) are errors too, so nothing is silently dropped.
    """
    hf = HFFolder(folder)
    arch = (hf.config.get("architectures") or ["?"])[0]
    check_config(hf.config, model, str(hf.folder / "config.json"))
    d, v, n_layers = model.hidden_size, model.vocab_size, model.num_layers
    internlm2 = arch == INTERNLM2
    embed_name = "model.tok_embeddings.weight" if internlm2 else "model.embed_tokens.weight"
    head_name = "output.weight" if internlm2 else "lm_head.weight"
    embed = _expect(hf, embed_name, (v, d))
    tied = head_name not in hf and hf.config.get("tie_word_embeddings", False)
    head = embed if tied else _expect(hf, head_name, (v, d))
    stacked: dict[str, np.ndarray] = {}
    for i in range(n_layers):
        for name, a in _layer_tensors(hf, arch, i, model):
            if name not in stacked:
                stacked[name] = np.empty((n_layers,) + a.shape, a.dtype)
            stacked[name][i] = a
    norm = _expect(hf, "model.norm.weight", (d,))
    unexpected = [name for name in hf.names() if name not in hf.read and not name.endswith(_IGNORED)]
    if unexpected:
        raise ConfigError(f"{hf.folder}: tensors the config has no place for: {sorted(unexpected)[:5]}")
    layers: dict[str, Any] = {}
    for name, a in stacked.items():
        node = layers
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = a
    return dict(
        tok_embeddings=np.asarray(embed),
        layers=layers,
        norm=dict(weight=norm),
        output=np.ascontiguousarray(np.asarray(head).T),
    )
