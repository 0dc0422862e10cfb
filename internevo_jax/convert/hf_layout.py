"""Tensor layouts between our params and Hugging Face's (a table of reshapes and RoPE channel permutations), and the
HF folder export (``save_hf``); the module doc of ``hf_config.py`` describes both layouts."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import ml_collections
import numpy as np

from internevo_jax.config import ffn_width
from internevo_jax.convert import safetensors_io
from internevo_jax.convert.hf_config import BAICHUAN, export_architecture, hf_config, make_dir_beside


def to_interleaved(x: np.ndarray) -> np.ndarray:
    """Half-split channels [c_0..c_{H/2-1}, s_0..] -> interleaved pairs [c_0, s_0, c_1, s_1, ...] on the last axis."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _to_half_split(x: np.ndarray) -> np.ndarray:
    """Inverse of ``to_interleaved``: InternEvo's ``[even..., odd...]`` reorder (HF-02 ``permute``)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def qk_layout(qkv: np.ndarray, groups: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Applies a channel permutation to the q and k slots of ``[..., G + 2, H]``; v is untouched."""
    out = qkv.copy()
    out[..., : groups + 1, :] = fn(qkv[..., : groups + 1, :])
    return out


def rope_layout(qkv: np.ndarray, groups: int, interleaved: bool) -> np.ndarray:
    """A copy of fused ``[..., G + 2, H]`` q/k/v weights with q and k channels in the Meta-interleaved layout
    (``interleaved``) or the half-split one, from the other layout."""
    return qk_layout(qkv, groups, to_interleaved if interleaved else _to_half_split)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the converters report to (``tools/convert_checkpoint.py``'s bar): a phase, then each tensor done."""

    def start(self, label: str, items: int | None, nbytes: int | None) -> None: ...

    def advance(self, nbytes: int) -> None: ...


_Cut = Callable[[np.ndarray], np.ndarray]
_Leaf = tuple[_Cut, list[tuple[str, tuple[int, ...], _Cut]]]  # (prep, [(HF name, HF shape, cut)]) of one leaf


class _Group(NamedTuple):
    """The HF tensors cut from one layer (or the whole) of one of our leaves."""

    leaf: str  # our dotted leaf name, e.g. "layers.attention.wqkv"
    layer: int | None  # the layer of a stacked leaf; None: the whole leaf
    prep: _Cut  # our array -> what the cuts read (a RoPE channel reorder, the normalised head)
    cuts: tuple[tuple[str, tuple[int, ...], _Cut], ...]  # (HF name, HF shape, cut)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _expert(j: int) -> _Cut:
    """Expert ``j`` of a stacked ``[experts, in, out]`` leaf, as HF's ``[out, in]``."""
    return lambda a: a[j].T


def _export_groups(model: ml_collections.ConfigDict, layout: str) -> list[_Group]:
    """The export table, leaf by leaf (so a streaming export reads each of our arrays once), layers inside."""
    arch = export_architecture(model, layout)
    n, k, d, v = model.num_attention_heads, model.num_kv_attention_heads, model.hidden_size, model.vocab_size
    g, hd, f = n // k, model.head_dim, ffn_width(d, model.mlp_ratio, model.multiple_of)

    def head(a: np.ndarray) -> np.ndarray:
        # The function the model computes uses the normalised head (M-07, HF-02); Baichuan's NormHead normalises it
        # itself, so its layout keeps the weights as they are (and the round trip bit-exact).
        if model.norm_head and arch != BAICHUAN:
            norm = np.linalg.norm(a.astype(np.float32), axis=0, keepdims=True)
            a = (a / np.maximum(norm, 1e-12)).astype(a.dtype)
        return a

    groups = [
        _Group("tok_embeddings", None, _same, (("model.embed_tokens.weight", (v, d), _same),)),
        _Group("norm.weight", None, _same, (("model.norm.weight", (d,), _same),)),
    ]
    if not model.tie_word_embeddings:  # tied: HF's lm_head is the embedding table, not written
        groups.append(_Group("output", None, head, (("lm_head.weight", (v, d), np.transpose),)))
    half: _Cut = (lambda a: qk_layout(a, g, _to_half_split)) if model.qk_interleaved else _same
    # head n = kv * G + g, the grouping HF's repeat_kv uses
    table: dict[str, _Leaf] = {
        "layers.attention.wqkv": (
            half,
            [
                ("self_attn.q_proj.weight", (n * hd, d), lambda w: w[:, :, :g].reshape(d, n * hd).T),
                ("self_attn.k_proj.weight", (k * hd, d), lambda w: w[:, :, g].reshape(d, k * hd).T),
                ("self_attn.v_proj.weight", (k * hd, d), lambda w: w[:, :, g + 1].reshape(d, k * hd).T),
            ],
        ),
        "layers.attention.wo": (_same, [("self_attn.o_proj.weight", (d, n * hd), lambda w: w.reshape(n * hd, d).T)]),
        "layers.attention.bqkv": (
            half,
            [
                ("self_attn.q_proj.bias", (n * hd,), lambda b: b[:, :g].reshape(n * hd)),
                ("self_attn.k_proj.bias", (k * hd,), lambda b: b[:, g].reshape(k * hd)),
                ("self_attn.v_proj.bias", (k * hd,), lambda b: b[:, g + 1].reshape(k * hd)),
            ],
        ),
        "layers.attention.bo": (_same, [("self_attn.o_proj.bias", (d,), _same)]),
    }
    if arch == BAICHUAN:  # W_pack: the q, k and v rows stacked (MHA)
        table["layers.attention.wqkv"] = (
            half,
            [("self_attn.W_pack.weight", (3 * n * hd, d), lambda w: w.transpose(2, 1, 3, 0).reshape(3 * n * hd, d))],
        )
    if not model.qkv_bias:
        del table["layers.attention.bqkv"]
    if not model.o_bias:
        del table["layers.attention.bo"]
    e = model.num_experts
    moe = "block_sparse_moe.experts."  # Mixtral's layout (transformers reads and writes it): one tensor per expert
    mlp: dict[str, _Leaf] = {
        "layers.feed_forward.w1": (_same, [("mlp.gate_proj.weight", (f, d), np.transpose)]),
        "layers.feed_forward.w3": (_same, [("mlp.up_proj.weight", (f, d), np.transpose)]),
        "layers.feed_forward.w2": (_same, [("mlp.down_proj.weight", (d, f), np.transpose)]),
    }
    if e > 1:
        mlp = {
            "layers.feed_forward.wg": (_same, [("block_sparse_moe.gate.weight", (e, d), np.transpose)]),
            **{
                f"layers.feed_forward.{w}": (
                    _same,
                    [(f"{moe}{j}.{w}.weight", shape, _expert(j)) for j in range(e)],
                )
                for w, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f)))
            },
        }
    table |= mlp | {
        "layers.attention_norm.weight": (_same, [("input_layernorm.weight", (d,), _same)]),
        "layers.ffn_norm.weight": (_same, [("post_attention_layernorm.weight", (d,), _same)]),
    }
    for leaf, (prep, cuts) in table.items():
        for i in range(model.num_layers):
            named = tuple((f"model.layers.{i}.{name}", shape, cut) for name, shape, cut in cuts)
            groups.append(_Group(leaf, i, prep, named))
    return groups


def _leaf(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def hf_tensors(
    params: Mapping[str, Any], model: ml_collections.ConfigDict, layout: str = "llama", dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Our pure-dict params -> ``(HF name, tensor)`` one at a time (contiguous numpy, ``dtype`` or the params').

    A leaf of ``params`` may be any array-like, also a lazy one that reads itself when ``np.asarray`` asks for it
    (``tools/convert_checkpoint.py`` reads our checkpoints so). Each leaf is converted to numpy once, when its first
    tensor is due, and dropped after its last, so a streaming export holds one of our arrays at a time.
    """
    current: str | None = None
    array = x = np.empty(0)  # placeholders until the first leaf is read
    for group in _export_groups(model, layout):
        if group.leaf != current:
            array = x = np.empty(0)  # let the previous leaf go (x's views hold it too) before the next one is read
            current, array = group.leaf, np.asarray(_leaf(params, group.leaf))
        x = group.prep(array if group.layer is None else array[group.layer])
        for name, _, cut in group.cuts:
            yield name, np.ascontiguousarray(cut(x), dtype=dtype)


def to_hf(params: Mapping[str, Any], model: ml_collections.ConfigDict, layout: str = "llama") -> dict[str, np.ndarray]:
    """Our pure-dict params -> an HF state dict of numpy arrays (same dtype), Llama names."""
    return dict(hf_tensors(params, model, layout))


def special_token_ids(
    generation: ml_collections.ConfigDict, tokenizer: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The special-token ids of an export: ``(config.json's, generation_config.json)``.

    ``config.json``: the tokenizer's ``bos``/``eos``/``pad`` ids (``hf_tokenizer``), or without one the
    ``generation`` section's ``bos_id`` and first EOS id. ``generation_config.json`` holds the stop ids of our
    generation (``eos_id`` + ``additional_eos_token_list``), so ``transformers``' ``generate`` stops where ours
    does, and a ``pad_token_id``: the tokenizer's pad, else the first stop id (transformers' own fallback; never the
    BOS, which transformers would mask out of every prompt that starts with it).
    """
    stops: list[int] = []
    for value in (generation.eos_id, generation.additional_eos_token_list):
        stops += [] if value is None else [value] if isinstance(value, int) else list(value)
    stops = list(dict.fromkeys(stops))
    if tokenizer is not None:
        bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    else:
        bos, eos, pad = generation.bos_id, stops[0] if stops else None, None
    config = {k: v for k, v in dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).items() if v is not None}
    gen: dict[str, Any] = {} if bos is None else dict(bos_token_id=bos)
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if pad is not None or stops:
        gen["pad_token_id"] = pad if pad is not None else stops[0]
    return config, gen


def save_hf(
    params: Mapping[str, Any],
    model: ml_collections.ConfigDict,
    folder: str | os.PathLike,
    layout: str = "llama",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: Progress | None = None,
    token_ids: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> Path:
    """Writes ``config.json`` + ``model[-k-of-n].safetensors`` (+ index when sharded) into ``folder``, and with
    ``token_ids`` (``special_token_ids``) the special-token ids into ``config.json`` and ``generation_config.json``.

    Streams: every tensor's name, shape and dtype follow from the config, so each shard's header is written first
    and the tensors (``hf_tensors``, one at a time) go straight after it; the export holds one of our arrays and one
    HF tensor beyond ``params``, whose leaves may be lazy. Files are written into a temporary sibling folder and
    renamed into place, so an interrupted export leaves either nothing or a complete folder; the folder gets the
    umask's permissions, as the files do. ``dtype`` (e.g. "bfloat16") casts on the way out; None keeps the params'.
    """
    import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy for the cast below)

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder for the export")
    groups = _export_groups(model, layout)
    want = None if dtype is None else np.dtype(dtype)
    plan = [
        (name, shape, want or np.dtype(_leaf(params, group.leaf).dtype))
        for group in groups
        for name, shape, _ in group.cuts
    ]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for name, shape, dt in plan:
        nbytes = math.prod(shape) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dt))
        size += nbytes
    total = sum(math.prod(shape) * dt.itemsize for _, shape, dt in plan)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_dir_beside(folder, "")
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    if progress is not None:
        progress.start("writing HF tensors", len(plan), total)
    try:
        safetensors_io.write_shards(tmp, files, shards, hf_tensors(params, model, layout, want), progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a source read can fail half-way, leaving half-written files
        raise
    if len(shards) > 1:
        index = dict(
            metadata=dict(total_size=total),
            weight_map={name: file for file, shard in zip(files, shards, strict=True) for name, _, _ in shard},
        )
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config(model, layout, plan[0][2].name)
    if token_ids is not None:
        config.update(token_ids[0])
        (tmp / "generation_config.json").write_text(json.dumps(dict(token_ids[1]), indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)
    return folder
