"""Reading Hugging Face model folders (``config.json`` + ``*.safetensors``, sharded or not) into our params.

The layouts are ``hf_config.py``'s and ``hf_layout.py``'s; this module finds the tensors, checks each against the
config and builds our arrays one layer at a time, so the checkpoint's tensors are never all in memory at once next to
ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from internevo_jax.config import ffn_width
from internevo_jax.convert import hf_config, hf_layout, safetensors_io
from internevo_jax.errors import CheckpointError, CheckpointMismatch


class HFFolder:
    """Lazy reader of an HF checkpoint folder: ``config`` plus tensors by name from one or many safetensors files."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{self.folder}: no config.json; is this a Hugging Face model folder?")
        self.config = _read_config(config)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files: dict[str, Path] | None = {name: self.folder / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' table): {e!r}") from None
        elif (self.folder / "model.safetensors").is_file():
            files = None  # one file: its header names the tensors
        else:
            found = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {found[:3]}: convert them to safetensors first)" if found else ""
            raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json{hint}")
        self._open: dict[Path, safetensors_io.SafetensorsFile] = {}
        self.read: set[str] = set()  # names handed out, so leftovers can be reported
        self.progress: hf_layout.Progress | None = None  # told of every tensor read
        if files is None:
            files = {
                name: self.folder / "model.safetensors"
                for name in self._handle(self.folder / "model.safetensors").keys()
            }
        self.files = files

    def _handle(self, path: Path) -> safetensors_io.SafetensorsFile:
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            self._open[path] = safetensors_io.SafetensorsFile(path)
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing")
        self.read.add(name)
        a = self._handle(self.files[name]).read(name)
        if self.progress is not None:
            self.progress.advance(a.nbytes)
        return a

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` from its file's header (no tensor is read)."""
        return tuple(self._handle(self.files[name]).table[name]["shape"])

    def dtype_code(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name`` ("BF16", "F32", ...) from its file's header."""
        return str(self._handle(self.files[name]).table[name]["dtype"])

    def sizes(self, names: list[str]) -> int:
        """Bytes of the tensors ``names``, from the files' headers (no tensor is read)."""
        return sum(self._handle(self.files[name]).nbytes(name) for name in names)


# config.json keys the conversion reads: required ones, then optional ones (None allowed), with their types.
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
_OPTIONAL: dict[str, type[int | float] | tuple[type[int | float], ...]] = dict(
    num_key_value_heads=int,
    head_dim=int,
    max_position_embeddings=int,
    rms_norm_eps=(int, float),
    rope_theta=(int, float),
)


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, with the keys the conversion reads checked: a ``CheckpointError`` names the file and
    the key instead of a KeyError or TypeError deep in the conversion."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a {type(config).__name__}, not a JSON object of model settings")
    for key in _REQUIRED:
        if key not in config:
            raise CheckpointError(f"{path}: key {key!r} is missing (a positive int)")
    for key, kind in [(k, int) for k in _REQUIRED] + list(_OPTIONAL.items()):
        value = config.get(key)
        if value is None and key not in _REQUIRED:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise CheckpointError(f"{path}: key {key!r} is {value!r}; a positive number is expected")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise CheckpointError(f"{path}: key 'architectures' is {arch!r}; a list of class names is expected")
    return config


def check_shapes(folder: HFFolder, model: ml_collections.ConfigDict) -> None:
    """Checks every tensor ``load_hf`` reads against the ``model`` section from the files' headers alone (no tensor
    is read), so a wrong folder fails before compiling; raises ``CheckpointMismatch`` naming each tensor
    and both shapes."""
    arch = (folder.config.get("architectures") or ["?"])[0]
    n, k, d, v = model.num_attention_heads, model.num_kv_attention_heads, model.hidden_size, model.vocab_size
    g, hd = n // k, model.head_dim
    f = ffn_width(d, model.mlp_ratio, model.multiple_of)
    qkv_bias, bias = model.qkv_bias, model.o_bias
    internlm2 = arch == hf_config.INTERNLM2
    want: dict[str, set[tuple[int, ...]]] = {
        ("model.tok_embeddings.weight" if internlm2 else "model.embed_tokens.weight"): {(v, d)},
        "model.norm.weight": {(d,)},
    }
    head = "output.weight" if internlm2 else "lm_head.weight"
    if head in folder or not folder.config.get("tie_word_embeddings", False):
        want[head] = {(v, d)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        layer: dict[str, set[tuple[int, ...]]]  # HF tensor name in the layer -> the shapes it may have
        if internlm2:
            layer = {
                "attention.wqkv.weight": {(k * (g + 2) * hd, d)},
                "attention.wo.weight": {(d, n * hd)},
                "feed_forward.w1.weight": {(f, d)},
                # w2/w3 may be swapped in InternLM2 exports (load_hf trusts the shape over the name)
                "feed_forward.w2.weight": {(d, f), (f, d)},
                "feed_forward.w3.weight": {(d, f), (f, d)},
                "attention_norm.weight": {(d,)},
                "ffn_norm.weight": {(d,)},
            }
            if qkv_bias:
                layer |= {"attention.wqkv.bias": {(k * (g + 2) * hd,)}}
            if bias:
                layer |= {"attention.wo.bias": {(d,)}}
        else:
            if arch == hf_config.BAICHUAN:
                layer = {"self_attn.W_pack.weight": {(3 * n * hd, d)}}
            else:
                layer = {
                    "self_attn.q_proj.weight": {(n * hd, d)},
                    "self_attn.k_proj.weight": {(k * hd, d)},
                    "self_attn.v_proj.weight": {(k * hd, d)},
                }
            layer |= {
                "self_attn.o_proj.weight": {(d, n * hd)},
                **_mlp_shapes(model, f, d),
                "input_layernorm.weight": {(d,)},
                "post_attention_layernorm.weight": {(d,)},
            }
            if qkv_bias:
                layer |= {
                    "self_attn.q_proj.bias": {(n * hd,)},
                    "self_attn.k_proj.bias": {(k * hd,)},
                    "self_attn.v_proj.bias": {(k * hd,)},
                }
            if bias:
                layer |= {"self_attn.o_proj.bias": {(d,)}}
        want |= {p + name: shapes for name, shapes in layer.items()}
    bad = []
    for name, shapes in want.items():
        if name not in folder:
            bad.append(f"{name}: missing (the config expects {min(shapes)})")
        elif folder.shape(name) not in shapes:
            bad.append(f"{name}: {folder.shape(name)} in the checkpoint, the config expects {min(shapes)}")
    if bad:
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise CheckpointMismatch(f"{folder.folder}: tensors do not fit the config: " + "; ".join(bad[:8]) + more)


def _mlp_shapes(model: ml_collections.ConfigDict, f: int, d: int) -> dict[str, set[tuple[int, ...]]]:
    """A Llama-layout layer's MLP tensors: the dense MLP, or Mixtral's router and experts."""
    if model.num_experts == 1:
        return {"mlp.gate_proj.weight": {(f, d)}, "mlp.up_proj.weight": {(f, d)}, "mlp.down_proj.weight": {(d, f)}}
    out: dict[str, set[tuple[int, ...]]] = {"block_sparse_moe.gate.weight": {(model.num_experts, d)}}
    for j in range(model.num_experts):
        x = f"block_sparse_moe.experts.{j}."
        out |= {x + "w1.weight": {(f, d)}, x + "w3.weight": {(f, d)}, x + "w2.weight": {(d, f)}}
    return out


def _expect(folder: HFFolder, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = folder.get(name)
    if tuple(a.shape) != tuple(shape):
        raise CheckpointMismatch(
            f"{folder.folder}: tensor {name!r} has shape {tuple(a.shape)}, the config expects {tuple(shape)}"
        )
    return a


def _layer_tensors(folder: HFFolder, arch: str, i: int, m: ml_collections.ConfigDict) -> Iterator[tuple[str, Any]]:
    """Yields ``(our leaf name, one layer's array in our layout)`` for layer ``i``."""
    n, k, d = m.num_attention_heads, m.num_kv_attention_heads, m.hidden_size
    g, hd = n // k, m.head_dim
    f = ffn_width(d, m.mlp_ratio, m.multiple_of)
    p = f"model.layers.{i}."
    qkv_bias, bias = m.qkv_bias, m.o_bias
    if arch == hf_config.INTERNLM2:
        wqkv = _expect(folder, p + "attention.wqkv.weight", (k * (g + 2) * hd, d)).T.reshape(d, k, g + 2, hd)
        bqkv = None
        if qkv_bias:
            bqkv = _expect(folder, p + "attention.wqkv.bias", (k * (g + 2) * hd,)).reshape(k, g + 2, hd)
        wo = _expect(folder, p + "attention.wo.weight", (d, n * hd))
        bo = _expect(folder, p + "attention.wo.bias", (d,)) if bias else None
        gate = _expect(folder, p + "feed_forward.w1.weight", (f, d))
        second, third = folder.get(p + "feed_forward.w2.weight"), folder.get(p + "feed_forward.w3.weight")
        # The down projection is [D, F] in HF's [out, in]; trust the shape over the name (w2/w3 hazard).
        down, up = (third, second) if f != d and tuple(third.shape) == (d, f) else (second, third)
        down = _check(folder, p + "feed_forward.w2 (down)", down, (d, f)).T
        up = _check(folder, p + "feed_forward.w3 (up)", up, (f, d)).T
        gate = gate.T
        norm1, norm2 = p + "attention_norm.weight", p + "ffn_norm.weight"
    else:
        if arch == hf_config.BAICHUAN:  # W_pack rows: [q; k; v], MHA
            w_pack = _expect(folder, p + "self_attn.W_pack.weight", (3 * n * hd, d))
            wqkv = w_pack.reshape(3, n, hd, d).transpose(3, 1, 0, 2)
        else:
            q = _expect(folder, p + "self_attn.q_proj.weight", (n * hd, d)).T.reshape(d, k, g, hd)
            kk = _expect(folder, p + "self_attn.k_proj.weight", (k * hd, d)).T.reshape(d, k, 1, hd)
            v = _expect(folder, p + "self_attn.v_proj.weight", (k * hd, d)).T.reshape(d, k, 1, hd)
            wqkv = np.concatenate([q, kk, v], axis=2)
        bqkv = None
        if qkv_bias:
            bq = _expect(folder, p + "self_attn.q_proj.bias", (n * hd,)).reshape(k, g, hd)
            bk = _expect(folder, p + "self_attn.k_proj.bias", (k * hd,)).reshape(k, 1, hd)
            bv = _expect(folder, p + "self_attn.v_proj.bias", (k * hd,)).reshape(k, 1, hd)
            bqkv = np.concatenate([bq, bk, bv], axis=1)
        wo = _expect(folder, p + "self_attn.o_proj.weight", (d, n * hd))
        bo = _expect(folder, p + "self_attn.o_proj.bias", (d,)) if bias else None
        if m.num_experts > 1:  # Mixtral: the router and one tensor per expert, stacked here on a leading E dim
            e, x = m.num_experts, p + "block_sparse_moe.experts."
            gate = np.stack([_expect(folder, f"{x}{j}.w1.weight", (f, d)) for j in range(e)])
            up = np.stack([_expect(folder, f"{x}{j}.w3.weight", (f, d)) for j in range(e)])
            down = np.stack([_expect(folder, f"{x}{j}.w2.weight", (d, f)) for j in range(e)])
            yield "feed_forward.wg", _expect(folder, p + "block_sparse_moe.gate.weight", (e, d)).T
            gate, up, down = (a.transpose(0, 2, 1) for a in (gate, up, down))
        else:
            gate = _expect(folder, p + "mlp.gate_proj.weight", (f, d)).T
            up = _expect(folder, p + "mlp.up_proj.weight", (f, d)).T
            down = _expect(folder, p + "mlp.down_proj.weight", (d, f)).T
        norm1, norm2 = p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
    if m.qk_interleaved:
        wqkv = hf_layout.qk_layout(wqkv, g, hf_layout.to_interleaved)
        bqkv = None if bqkv is None else hf_layout.qk_layout(bqkv, g, hf_layout.to_interleaved)
    yield "attention.wqkv", wqkv
    yield "attention.wo", wo.T.reshape(n, hd, d)
    if qkv_bias:
        yield "attention.bqkv", bqkv
    if bias:
        yield "attention.bo", bo
    yield "feed_forward.w1", gate
    yield "feed_forward.w3", up
    yield "feed_forward.w2", down
    yield "attention_norm.weight", _expect(folder, norm1, (d,))
    yield "ffn_norm.weight", _expect(folder, norm2, (d,))


def _check(folder: HFFolder, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(a.shape) != shape:
        raise CheckpointMismatch(
            f"{folder.folder}: tensor {name!r} has shape {tuple(a.shape)}, the config expects {shape}"
        )
    return a


def load_hf(
    folder: str | os.PathLike,
    model: ml_collections.ConfigDict,
    dtype: Any = None,
    progress: hf_layout.Progress | None = None,
) -> dict[str, Any]:
    """An HF folder -> our pure-dict params (numpy, ``dtype`` or the checkpoint's), checked against the ``model``
    section.

    Every mismatch is an error naming the config key or tensor and both values; unexpected tensors (another
    architecture's weights) are errors too, so nothing is silently dropped. Tensors are read one at a time and
    cast into our arrays as they come, so a load holds the result (in ``dtype``) plus one tensor.
    """
    hf = HFFolder(folder)
    arch = (hf.config.get("architectures") or ["?"])[0]
    hf_config.check_config(hf.config, model, str(hf.folder / "config.json"))
    if progress is not None:
        wanted = [name for name in hf.names() if not name.endswith(hf_config.IGNORED)]
        progress.start("reading HF tensors", len(wanted), hf.sizes(wanted))
        hf.progress = progress
    d, v, n_layers = model.hidden_size, model.vocab_size, model.num_layers
    internlm2 = arch == hf_config.INTERNLM2
    embed_name = "model.tok_embeddings.weight" if internlm2 else "model.embed_tokens.weight"
    head_name = "output.weight" if internlm2 else "lm_head.weight"
    embed = _expect(hf, embed_name, (v, d))
    tied = head_name not in hf and hf.config.get("tie_word_embeddings", False)
    head = embed if tied else _expect(hf, head_name, (v, d))  # a tied HF head into an untied model: a copy
    if model.tie_word_embeddings and not np.array_equal(head, embed):
        raise CheckpointMismatch(
            f"{hf.folder}: {head_name} differs from {embed_name}, but model.tie_word_embeddings=True"
        )
    stacked: dict[str, np.ndarray] = {}
    for i in range(n_layers):
        for name, a in _layer_tensors(hf, arch, i, model):
            if name not in stacked:
                stacked[name] = np.empty((n_layers,) + a.shape, dtype or a.dtype)
            stacked[name][i] = a
    norm = _expect(hf, "model.norm.weight", (d,))
    unexpected = [name for name in hf.names() if name not in hf.read and not name.endswith(hf_config.IGNORED)]
    if unexpected:
        raise CheckpointMismatch(f"{hf.folder}: tensors the config has no place for: {sorted(unexpected)[:5]}")
    layers: dict[str, Any] = {}
    for name, a in stacked.items():
        node = layers
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = a
    params = dict(tok_embeddings=np.asarray(embed, dtype), layers=layers, norm=dict(weight=np.asarray(norm, dtype)))
    if not model.tie_word_embeddings:
        params["output"] = np.ascontiguousarray(np.asarray(head).T, dtype)
    return params
