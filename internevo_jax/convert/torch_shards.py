"""PyTorch state-dict shards -> our arrays: what each tensor name means, and where each shard's piece goes.

Shared by the folder readers in ``torch_ckpt.py`` (InternEvo step folders, Meta's consolidated weights). Names are
InternLM1's (``blocks.{i}.mixer.Wqkv``) or InternLM2's / Llama's (``layers.{i}.attention.wqkv`` or ``wq/wk/wv``),
M-01; INTERNLM_MoE's router, residual MLP and coefficients in the rank files, its experts' w1/w2/w3 (TP-split as an
MLP, or whole) placed by expert id into the stacked ``[L, E, ...]`` arrays. Merge rules (M-02, M-04, HF-01, HF-02,
P-07): column-parallel weights (q/k/v, w1, the up projection, the head) are split on dim 0, row-parallel ones (out
and down projections) on dim 1; the out-projection bias lives on TP rank 0; norms are replicated; the embedding is
split on the hidden dim (``embed_split_hidden``) or the vocab dim. InternLM1's ``Wqkv`` holds ``[q; k; v]`` of its
own heads on each shard, InternLM2's ``wqkv`` is grouped per kv head so a contiguous split keeps whole groups. Under
isp every block linear is split on dim 0 over the weight-parallel group.

Each shard is written straight into its place in our arrays through a numpy view of them in the PyTorch layout, so
a load holds the merged model plus one shard. Split dims and the down projection are told by shape (InternLM1
converters call the down projection ``w3``, docs/internevo_parity.md#ffn-naming-hazard), names only break ties.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import ml_collections
import numpy as np

from internevo_jax.config import ConfigError, ffn_width
from internevo_jax.convert import hf_layout

_KEY = re.compile(r"(?:(?P<chunk>\d+)\.)?(?:model\.)?(?P<rest>.+)")  # interleaved chunk, a leftover wrapper
_LAYER = re.compile(r"(?:blocks|layers)\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)")
_ROLES = {  # module name -> role; w2/w3 are resolved to down/up by shape
    "Wqkv": ("mixer.Wqkv",),
    "wqkv": ("attention.wqkv",),
    "wq": ("attention.wq",),
    "wk": ("attention.wk",),
    "wv": ("attention.wv",),
    "wo": ("mixer.out_proj", "attention.wo"),
    "w1": ("mlp.w1", "feed_forward.w1"),
    "w2": ("mlp.w2", "feed_forward.w2"),
    "w3": ("mlp.w3", "feed_forward.w3"),
    "attention_norm": ("norm1", "attention_norm"),
    "ffn_norm": ("norm2", "ffn_norm"),
    # embed_split_hidden=False uses flash-attn's vocab-parallel embedding: ``.word_embeddings``
    "embed": ("embedding", "embedding.word_embeddings", "tok_embeddings", "tok_embeddings.word_embeddings"),
    "head": ("head", "output"),
    "norm": ("norm",),
    # INTERNLM_MoE (M-01): the router and residual MoE's dense MLP + mixing coefficients live in the rank files;
    # the experts' w1/w2/w3 come from model_moe_layer{L}_expert{E}_tp{t}.pt (role "w1"/"w2"/"w3" with an expert id)
    "wg": ("mlp.moe_layer.gate.wg",),
    "res_w1": ("mlp.residual_mlp.w1",),
    "res_w2": ("mlp.residual_mlp.w2",),
    "res_w3": ("mlp.residual_mlp.w3",),
    "coefficient": ("mlp.coefficient",),
}
_MODULES = {module: role for role, modules in _ROLES.items() for module in modules}
_EXPERT = re.compile(r"(?:.+\.)?moe_layer\.experts\.wrapped_experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight")
_QKV = ("Wqkv", "wqkv", "wq", "wk", "wv")
_LEAVES = {  # (role, param) -> our leaf
    **{(r, "weight"): "layers.attention.wqkv" for r in _QKV},
    **{(r, "bias"): "layers.attention.bqkv" for r in _QKV},
    ("wo", "weight"): "layers.attention.wo",
    ("wo", "bias"): "layers.attention.bo",
    ("w1", "weight"): "layers.feed_forward.w1",
    ("up", "weight"): "layers.feed_forward.w3",
    ("down", "weight"): "layers.feed_forward.w2",
    ("wg", "weight"): "layers.feed_forward.wg",
    ("res_w1", "weight"): "layers.feed_forward.res_w1",
    ("res_up", "weight"): "layers.feed_forward.res_w3",
    ("res_down", "weight"): "layers.feed_forward.res_w2",
    ("coefficient", "weight"): "layers.feed_forward.coefficient",
    ("coefficient", "bias"): "layers.feed_forward.coefficient_bias",
    **{(n, p): f"layers.{n}.{p}" for n in ("attention_norm", "ffn_norm") for p in ("weight", "bias")},
    **{("norm", p): f"norm.{p}" for p in ("weight", "bias")},
    ("embed", "weight"): "tok_embeddings",
    ("head", "weight"): "output",
}


def parse(name: str) -> tuple[int, str, str, int | None] | None:
    """``(chunk, role, param, local layer)`` of a state-dict name (role "?" if unknown); None for RoPE buffers."""
    match = _KEY.fullmatch(name)
    if match is None:  # only the empty name
        raise unknown(f"the weight named {name!r}")
    chunk, rest = int(match["chunk"] or 0), match["rest"]
    if "rotary_emb." in rest or rest.endswith("inv_freq") or rest == "rope.freqs":
        return None  # recomputed from the config
    layer = _LAYER.fullmatch(rest)
    if layer and _MODULES.get(layer["module"]) not in (None, "embed", "head", "norm"):
        return chunk, _MODULES[layer["module"]], layer["param"], int(layer["i"])
    module, _, param = rest.rpartition(".")
    if _MODULES.get(module) in ("embed", "head", "norm") and param in ("weight", "bias"):
        return chunk, _MODULES[module], param, None
    return chunk, "?", rest, None


def parse_expert(name: str) -> tuple[int, str] | None:
    """``(expert id in the name, "w1" / "w2" / "w3")`` of a tensor in an InternEvo expert file, else None."""
    match = _EXPERT.fullmatch(name)
    return None if match is None else (int(match["e"]), match["w"])


def unknown(what: str) -> ConfigError:
    return ConfigError(
        f"{what} is not a weight of the INTERNLM / INTERNLM2 / LLAMA2 / INTERNLM_MoE layouts (reward heads and "
        "other models are not supported)"
    )


def _our_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Dotted leaf name -> shape of our params (the tree ``model.Decoder`` creates)."""
    d, v, n_layers, n, k = m.hidden_size, m.vocab_size, m.num_layers, m.num_attention_heads, m.num_kv_attention_heads
    f = ffn_width(d, m.mlp_ratio, m.multiple_of)
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings": (v, d),
        "layers.attention.wqkv": (n_layers, d, k, n // k + 2, d // n),
        "layers.attention.wo": (n_layers, n, d // n, d),
        "layers.feed_forward.w1": (n_layers, d, f),
        "layers.feed_forward.w3": (n_layers, d, f),
        "layers.feed_forward.w2": (n_layers, f, d),
        "output": (d, v),
    }
    e = m.get("num_experts", 1)
    if e > 1:  # moe.py's leaves: stacked experts [L, E, ...], the router, residual MoE's MLP and coefficients
        shapes |= {f"layers.feed_forward.w{j}": (n_layers, e) + shapes[f"layers.feed_forward.w{j}"][1:] for j in "123"}
        shapes["layers.feed_forward.wg"] = (n_layers, d, e)
        if m.moe_use_residual:
            shapes |= {
                "layers.feed_forward.res_w1": (n_layers, d, f),
                "layers.feed_forward.res_w3": (n_layers, d, f),
                "layers.feed_forward.res_w2": (n_layers, f, d),
                "layers.feed_forward.coefficient": (n_layers, d, 2),
                "layers.feed_forward.coefficient_bias": (n_layers, 2),
            }
    if not m.no_bias:
        shapes |= {"layers.attention.bqkv": (n_layers, k, n // k + 2, d // n), "layers.attention.bo": (n_layers, d)}
    norms: dict[str, tuple[int, ...]] = {"layers.attention_norm": (n_layers, d), "layers.ffn_norm": (n_layers, d)}
    norms |= {} if m.apply_post_layer_norm else {"norm": (d,)}
    for name, shape in norms.items():
        shapes |= {f"{name}.{p}": shape for p in ("weight",) + (("bias",) if m.norm_type != "rmsnorm" else ())}
    return shapes


def _split_first(x: np.ndarray, parts: int) -> np.ndarray:
    """``[A, ...] -> [parts, A / parts, ...]`` as a view (``reshape`` could silently copy a strided array)."""
    rows, stride = x.shape[0] // parts, x.strides[0]
    return np.lib.stride_tricks.as_strided(x, (parts, rows) + x.shape[1:], (stride * rows, stride) + x.strides[1:])


def _write_rows(dst: np.ndarray, lead: int, start: int, src: np.ndarray) -> None:
    """``dst`` with its first ``lead`` dims flattened (C order) gets rows ``[start, start + len(src))`` = ``src``.

    Our arrays seen in a PyTorch layout are not always flattenable without a copy, so the row range is cut into
    blocks along the leading dims instead.
    """
    count = math.prod(dst.shape[:lead])
    if start == 0 and len(src) == count:
        dst[...] = src.reshape(dst.shape)
    elif lead == 1:
        dst[start : start + len(src)] = src
    else:
        inner, stop = count // dst.shape[0], start + len(src)
        for i in range(start // inner, -(-stop // inner)):
            lo, hi = max(start, i * inner), min(stop, (i + 1) * inner)
            _write_rows(dst[i], lead - 1, lo - i * inner, src[lo - start : hi - start])


class Assembler:
    """Fills our params from shard tensors in place and counts what was written, so gaps are reported by name."""

    def __init__(
        self, model: ml_collections.ConfigDict, where: str, embed_hidden: bool, isp: bool = False, dtype: Any = None
    ):
        self.m, self.where, self.isp, self.dtype = model, where, isp, dtype
        self.g = model.num_attention_heads // model.num_kv_attention_heads
        self.shapes = _our_shapes(model)
        self.embed_axes = (1, 0, None) if embed_hidden else (0, 1, None)
        self.out: dict[str, np.ndarray] = {}
        self.written: dict[tuple[str, int | None], int] = defaultdict(int)
        self.seen: set[tuple[str, int | None]] = set()
        self.roles: set[str] = set()

    def _view(
        self, role: str, param: str, x: np.ndarray, count: int, expert: int | None = None
    ) -> tuple[np.ndarray, int]:
        """Our array ``x`` (one layer's) seen in the PyTorch layout: ``(view, how many leading dims are rows)``."""
        g = self.g
        if role in _QKV:
            rows = x if param == "bias" else np.moveaxis(x, 0, -1)  # [K, G + 2, H(, D)]: rows = out features
            if role == "wqkv":  # M-04: per kv group [q_0..q_{G-1}, k, v]
                return rows, 3
            if role == "wq":
                return rows[:, :g], 3
            if role in ("wk", "wv"):
                return rows[:, g + (role == "wv")], 2
            # InternLM1 (MHA, G = 1): [q; k; v] of its own heads per TP shard; one [q; k; v] split on rows under isp
            return np.swapaxes(_split_first(rows, 1 if self.isp else count), 1, 2), 4
        if role == "wo":
            return (x if param == "bias" else np.moveaxis(x, -1, 0)), 1  # [D, N, H]
        if expert is not None:
            x = x[expert]
        if role == "coefficient" and param == "bias":
            return x, 1
        transposed = ("w1", "up", "down", "head", "wg", "res_w1", "res_up", "res_down", "coefficient")
        return (x.T if role in transposed else x), 1

    def _axis(
        self, role: str, param: str, a: np.ndarray, count: int, what: str | None = None, expert: int | None = None
    ) -> Any:
        """The dim this shard was split on (None: a whole copy), from its shape. ``what`` None: probe (False if it
        does not fit); else a misfit is an error naming both shapes."""
        leaf = _LEAVES.get((role, param))
        if leaf not in self.shapes:
            return None if what else False  # place() reports it
        shape = self.shapes[leaf][1:] if leaf.startswith("layers.") else self.shapes[leaf]
        view, rows = self._view(role, param, np.broadcast_to(np.empty((), np.int8), shape), count, expert)
        full = (math.prod(view.shape[:rows]),) + ((math.prod(view.shape[rows:]),) if view.ndim > rows else ())
        replicated = ("attention_norm", "ffn_norm", "norm", "wg", "coefficient")  # the router: a plain nn.Linear
        if role in replicated or (role, param, self.isp) == ("wo", "bias", False):
            axes: tuple[int | None, ...] = (None,)
        elif role in ("embed", "head"):
            axes = self.embed_axes if role == "embed" else (0, None)
        elif self.isp:
            axes = (0, None) if param == "bias" else (0,)
        else:
            axes = (0,) if role in _QKV + ("w1", "up", "res_w1", "res_up") else (1,)
        if expert is not None:  # experts kept whole on every TP rank (newer InternEvo's expert no_tp): one copy
            axes += (None,)
        wants = []
        for axis in axes:
            want = list(full)
            if axis is not None:
                want[axis] //= count
            if tuple(a.shape) == tuple(want) and (axis is None or full[axis] % count == 0):
                return axis
            wants.append(tuple(want))
        if what is None:
            return False
        hint = "model.vocab_size / model.hidden_size"
        if leaf.startswith("layers.attention"):
            hint = "model.hidden_size / model.num_attention_heads / model.num_kv_attention_heads"
        elif leaf.startswith("layers.feed_forward"):
            hint = "model.hidden_size / model.mlp_ratio / model.multiple_of"
        split = count > 1 and axes[0] is not None
        raise ConfigError(
            f"{what} has shape {tuple(a.shape)}, the config expects {wants[0]}"
            + (f" (one of {count} shards of {full})" if split else "")
            + f"; fix {hint} in the config, or check that no shard file is missing"
        )

    def place(
        self,
        what: str,
        role: str,
        param: str,
        i: int | None,
        a: np.ndarray,
        shard: int,
        count: int,
        expert: int | None = None,
    ) -> None:
        """Writes shard ``shard`` of ``count`` of one tensor (layer ``i``; of expert ``expert`` for an MoE expert's
        w1/w2/w3); repeated copies are skipped."""
        if role in ("w2", "w3", "res_w2", "res_w3"):  # the down projection is [D, F] in PyTorch: the shape decides
            res = "res_" if role.startswith("res_") else ""
            order = (res + "down", res + "up") if role.endswith("w2") else (res + "up", res + "down")
            role = ([r for r in order if self._axis(r, param, a, count, expert=expert) is not False] or order)[0]
        if role in ("w1", "up", "down") and (expert is None) != (self.m.get("num_experts", 1) == 1):
            raise ConfigError(
                f"{what} is {'a dense MLP' if expert is None else 'an MoE expert'} weight, but the config has "
                f"model.num_experts={self.m.get('num_experts', 1)}; set model_type / model.num_experts to the "
                "checkpoint's model"
            )
        if role == "Wqkv" and self.g != 1:
            raise ConfigError(
                f"{what} is InternLM1's fused [q; k; v] of multi-head attention, but the config has "
                f"num_kv_attention_heads={self.m.num_kv_attention_heads}; set "
                f"--config.model.num_kv_attention_heads={self.m.num_attention_heads}"
            )
        if (role, param, self.isp) == ("wo", "bias", False) and shard != 0:
            return  # row-parallel bias: added once, by TP rank 0 (M-02); other ranks hold none or a copy
        leaf = _LEAVES.get((role, param))
        if leaf not in self.shapes:
            hint = {"bias": " (model.no_bias / model.norm_type?)", "norm": " (model.apply_post_layer_norm?)"}
            raise ConfigError(f"{what} has no place in the config{hint.get(param, hint.get(role, ''))}")
        if i is not None and not 0 <= i < self.m.num_layers:
            raise ConfigError(f"{what} is layer {i}, but model.num_layers={self.m.num_layers}")
        axis = self._axis(role, param, a, count, what, expert)
        key = (f"{i}.{expert}.{role}.{param}", None if axis is None else shard)
        if key in self.seen:
            return  # a replicated tensor, or an isp shard that several files hold
        self.seen.add(key)
        self.roles.add(role)
        if leaf not in self.out:
            self.out[leaf] = np.empty(self.shapes[leaf], self.dtype or a.dtype)  # shards are cast as they land
        view, rows = self._view(role, param, self.out[leaf] if i is None else self.out[leaf][i], count, expert)
        if axis is None:
            view[...] = a.reshape(view.shape)
        else:
            if axis == 1:  # put the split dim first
                view = view.transpose(tuple(range(rows, view.ndim)) + tuple(range(rows)))
                rows, a = view.ndim - rows, a.T
            _write_rows(view, rows, shard * a.shape[0], a.reshape((a.shape[0],) + view.shape[rows:]))
        self.written[(leaf, i)] += a.size

    def finish(self, stored_interleaved: bool) -> dict[str, Any]:
        """The nested params, q/k channels in the config's RoPE layout; raises naming every leaf not filled."""
        gaps = []
        for leaf, shape in self.shapes.items():
            per_layer = leaf.startswith("layers.")
            size = math.prod(shape[per_layer:])
            short = [i for i in (range(shape[0]) if per_layer else [None]) if self.written[(leaf, i)] != size]
            if short:
                gaps.append(leaf + (f" (layers {short[:8]}{'...' * (len(short) > 8)})" if per_layer else ""))
        if gaps:
            raise ConfigError(f"{self.where}: the checkpoint holds nothing (or not all) for: " + "; ".join(gaps))
        tree: dict[str, Any] = {}
        for leaf, a in self.out.items():
            *path, last = leaf.split(".")
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[last] = a
        if stored_interleaved != bool(self.m.qk_interleaved):
            attn = tree["layers"]["attention"]
            for name in ("wqkv", "bqkv"):
                for i in range(len(attn.get(name, ()))):  # per layer: one layer's copy at a time
                    attn[name][i] = hf_layout.rope_layout(attn[name][i], self.g, self.m.qk_interleaved)
        return tree
