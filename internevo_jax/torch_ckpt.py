"""Readers of PyTorch checkpoints: InternEvo step folders (reference CK-01) and Meta's consolidated Llama weights.

Both return our pure-dict params (numpy, the checkpoint's dtype), the tree ``convert.load_hf`` returns, so the
Trainer and ``tools/convert_checkpoint.py`` treat every source alike. Model weights only: optimizer and sampler
states of another framework do not carry over.

InternEvo saves one ``torch.save`` state dict per rank (``model_tp{t}_pp{p}.pt``; under isp
``model_tp{t}_wp{w}_pp{p}.pt`` or ``model_wp{w}_pp{p}.pt``) holding local shards, with layer indices local to the
pipeline stage (behind a ``{chunk}.`` prefix with interleaved pipelines). Names are InternLM1's
(``blocks.{i}.mixer.Wqkv``) or InternLM2's / Llama's (``layers.{i}.attention.wqkv`` or ``wq/wk/wv``), M-01. Merge
rules (M-02, M-04, HF-01, HF-02, P-07): column-parallel weights (q/k/v, w1, the up projection, the head) are split
on dim 0, row-parallel ones (out and down projections) on dim 1; the out-projection bias lives on TP rank 0; norms
are replicated; the embedding is split on the hidden dim (``embed_split_hidden``) or the vocab dim. InternLM1's
``Wqkv`` holds ``[q; k; v]`` of its own heads on each shard, InternLM2's ``wqkv`` is grouped per kv head so a
contiguous split keeps whole groups. Under isp every block linear is split on dim 0 over the weight-parallel group.
Meta's ``consolidated.{NN}.pth`` are model-parallel shards with InternEvo-Llama names and the same rules.

Each shard is written straight into its place in our arrays through a numpy view of them in the PyTorch layout, so
a load holds the merged model plus one (memory-mapped) shard file. Split dims and the down projection are told by
shape (InternLM1 converters call the down projection ``w3``, reference §1.4), names only break ties.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from internevo_jax import convert
from internevo_jax.checkpoint import CheckpointError
from internevo_jax.config import ConfigError, ffn_width
from internevo_jax.metrics import get_logger

_MODEL_FILE = re.compile(r"model(?:_tp(?P<t>\d+))?(?:_wp(?P<w>\d+))?_pp(?P<p>\d+)(?:_dp(?P<d>\d+))?\.pt")
_META_FILE = re.compile(r"consolidated\.(\d+)\.pth")
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
}
_MODULES = {module: role for role, modules in _ROLES.items() for module in modules}
_QKV = ("Wqkv", "wqkv", "wq", "wk", "wv")
_LEAVES = {  # (role, param) -> our leaf
    **{(r, "weight"): "layers.attention.wqkv" for r in _QKV},
    **{(r, "bias"): "layers.attention.bqkv" for r in _QKV},
    ("wo", "weight"): "layers.attention.wo",
    ("wo", "bias"): "layers.attention.bo",
    ("w1", "weight"): "layers.feed_forward.w1",
    ("up", "weight"): "layers.feed_forward.w3",
    ("down", "weight"): "layers.feed_forward.w2",
    **{(n, p): f"layers.{n}.{p}" for n in ("attention_norm", "ffn_norm") for p in ("weight", "bias")},
    **{("norm", p): f"norm.{p}" for p in ("weight", "bias")},
    ("embed", "weight"): "tok_embeddings",
    ("head", "weight"): "output",
}
_SAVED_KEYS = tuple(  # model_config.pt keys whose disagreement changes the function computed
    "vocab_size hidden_size num_layers num_attention_heads num_kv_attention_heads layer_norm_epsilon rope_base "
    "norm_type apply_post_layer_norm norm_head".split()
)


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading InternEvo .pt checkpoints needs torch: pip install torch") from e
    return torch


def _load(path: Path) -> Any:
    """One ``torch.save`` file (``weights_only``: tensors and plain containers), memory-mapped when possible."""
    torch = _torch()
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: cannot be mapped
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) cannot read it: {e}") from e


def _tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, numpy array)`` of one file (bfloat16 as ml_dtypes'); the file is released when the loop ends."""
    torch, state = _torch(), _load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            import ml_dtypes

            yield name, t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def _parse(name: str) -> tuple[int, str, str, int | None] | None:
    """``(chunk, role, param, local layer)`` of a state-dict name (role "?" if unknown); None for RoPE buffers."""
    match = _KEY.fullmatch(name)
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


def _unknown(what: str) -> ConfigError:
    return ConfigError(
        f"{what} is not a weight of the INTERNLM / INTERNLM2 / LLAMA2 layouts (MoE experts, reward heads and other "
        "models are not supported)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing shards into our arrays


def _our_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Dotted leaf name -> shape of our params (the tree ``model.Decoder`` creates)."""
    d, v, n_layers, n, k = m.hidden_size, m.vocab_size, m.num_layers, m.num_attention_heads, m.num_kv_attention_heads
    f = ffn_width(d, m.mlp_ratio, m.multiple_of)
    shapes = {
        "tok_embeddings": (v, d),
        "layers.attention.wqkv": (n_layers, d, k, n // k + 2, d // n),
        "layers.attention.wo": (n_layers, n, d // n, d),
        "layers.feed_forward.w1": (n_layers, d, f),
        "layers.feed_forward.w3": (n_layers, d, f),
        "layers.feed_forward.w2": (n_layers, f, d),
        "output": (d, v),
    }
    if not m.no_bias:
        shapes |= {"layers.attention.bqkv": (n_layers, k, n // k + 2, d // n), "layers.attention.bo": (n_layers, d)}
    norms = {"layers.attention_norm": (n_layers, d), "layers.ffn_norm": (n_layers, d)}
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


class _Assembler:
    """Fills our params from shard tensors in place and counts what was written, so gaps are reported by name."""

    def __init__(self, model: ml_collections.ConfigDict, where: str, embed_hidden: bool, isp: bool = False):
        self.m, self.where, self.isp = model, where, isp
        self.g = model.num_attention_heads // model.num_kv_attention_heads
        self.shapes = _our_shapes(model)
        self.embed_axes = (1, 0, None) if embed_hidden else (0, 1, None)
        self.out: dict[str, np.ndarray] = {}
        self.written: dict[tuple[str, int | None], int] = defaultdict(int)
        self.seen: set[tuple[str, int | None]] = set()
        self.roles: set[str] = set()

    def _view(self, role: str, param: str, x: np.ndarray, count: int) -> tuple[np.ndarray, int]:
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
        return (x.T if role in ("w1", "up", "down", "head") else x), 1

    def _axis(self, role: str, param: str, a: np.ndarray, count: int, what: str | None = None) -> Any:
        """The dim this shard was split on (None: a whole copy), from its shape. ``what`` None: probe (False if it
        does not fit); else a misfit is an error naming both shapes."""
        leaf = _LEAVES.get((role, param))
        if leaf not in self.shapes:
            return None if what else False  # place() reports it
        shape = self.shapes[leaf][1:] if leaf.startswith("layers.") else self.shapes[leaf]
        view, rows = self._view(role, param, np.broadcast_to(np.empty((), np.int8), shape), count)
        full = (math.prod(view.shape[:rows]),) + ((math.prod(view.shape[rows:]),) if view.ndim > rows else ())
        if role in ("attention_norm", "ffn_norm", "norm") or (role, param, self.isp) == ("wo", "bias", False):
            axes: tuple[int | None, ...] = (None,)
        elif role in ("embed", "head"):
            axes = self.embed_axes if role == "embed" else (0, None)
        elif self.isp:
            axes = (0, None) if param == "bias" else (0,)
        else:
            axes = (0,) if role in _QKV + ("w1", "up") else (1,)
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

    def place(self, what: str, role: str, param: str, i: int | None, a: np.ndarray, shard: int, count: int) -> None:
        """Writes shard ``shard`` of ``count`` of one tensor (layer ``i``); repeated copies are skipped."""
        if role in ("w2", "w3"):  # the down projection is [D, F] in PyTorch: the shape decides, then the name
            order = ("down", "up") if role == "w2" else ("up", "down")
            role = ([r for r in order if self._axis(r, param, a, count) is not False] or order)[0]
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
        axis = self._axis(role, param, a, count, what)
        key = (f"{i}.{role}.{param}", None if axis is None else shard)
        if key in self.seen:
            return  # a replicated tensor, or an isp shard that several files hold
        self.seen.add(key)
        self.roles.add(role)
        if leaf not in self.out:
            self.out[leaf] = np.empty(self.shapes[leaf], a.dtype)
        view, rows = self._view(role, param, self.out[leaf] if i is None else self.out[leaf][i], count)
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
                    attn[name][i] = convert.rope_layout(attn[name][i], self.g, self.m.qk_interleaved)
        return tree


# ---------------------------------------------------------------------------------------------------------------------
# InternEvo step folders


class _Files(NamedTuple):
    files: dict[tuple[int, int, int], Path]  # (tp rank, wp rank, pp rank) -> file
    tp: int
    wp: int
    pp: int
    isp: bool
    saved: dict[str, Any] | None  # model_config.pt (InternEvo's ``model`` section), when readable


def _has_model_files(p: Path) -> bool:
    return any(_MODEL_FILE.fullmatch(f.name) for f in p.iterdir())


def is_internevo_folder(path: str | Path) -> bool:
    """A step folder (``model_tp0_pp0.pt`` ...) or a save folder of them (``{step}/{step}.step`` markers)."""
    p = Path(path)
    return p.is_dir() and (_has_model_files(p) or any(p.glob("*.step")) or any(p.glob("*/*.step")))


def find_step(path: str | Path, step: int | None = None) -> Path:
    """A step folder, or a save folder -> its newest (or ``step``'s) complete step folder (CK-03: the
    ``{step}.step`` marker is written last; snapshot folders included)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"InternEvo checkpoint {p} does not exist or is not a folder")
    if _has_model_files(p):
        return p
    found = [(int(m.stem), m.parent) for m in p.rglob("*.step") if m.stem.isdigit() and _has_model_files(m.parent)]
    found = [x for x in found if step is None or x[0] == step]
    if not found:
        raise CheckpointError(
            f"{p} holds no complete InternEvo {'step folder' if step is None else f'step {step}'}: expected "
            "model_tp*_pp*.pt files, or numbered folders with them and their {step}.step marker"
        )
    return max(found, key=lambda x: x[0])[1]


def _internevo_files(folder: Path) -> _Files:
    """The shard files of a step folder, all of them there, and its ``model_config.pt``."""
    files, isp = {}, False
    for f in sorted(folder.iterdir()):
        if f.name.startswith("model_moe_layer"):
            raise ConfigError(f"{f}: an MoE expert file; MoE models are not supported")
        if not (m := _MODEL_FILE.fullmatch(f.name)):
            continue
        if m["d"] is not None:
            raise CheckpointError(
                f"{f}: a FSDP shard (parallel.zero1.fsdp=True) holds torch ShardedTensors, which only "
                "torch.distributed can reassemble; load it in InternEvo without fsdp and save it again"
            )
        files[(int(m["t"] or 0), int(m["w"] or 0), int(m["p"]))] = f
        isp |= m["w"] is not None
    if not files:
        raise CheckpointError(f"{folder}: no model_tp*_pp*.pt files; is this an InternEvo step folder?")
    tp, wp, pp = (max(k[i] for k in files) + 1 for i in range(3))
    missing = []
    for p in range(pp):
        if isp:  # only the ranks' (t, w) pairs exist: every w (block shards) and t (embedding, head) is needed
            missing += [f"wp{w}_pp{p}" for w in range(wp) if not any(k[1:] == (w, p) for k in files)]
            missing += [f"tp{t}_pp{p}" for t in range(tp) if not any(k[::2] == (t, p) for k in files)]
        else:
            missing += [f"model_tp{t}_pp{p}.pt" for t in range(tp) if (t, 0, p) not in files]
    if missing:
        grid = f"tp={tp}, {f'wp={wp}, ' if isp else ''}pp={pp}"
        raise CheckpointError(f"{folder}: shard files missing: {missing} (the others make {grid}); copy them all")
    saved = None
    if (folder / "model_config.pt").is_file():
        _torch()  # a missing torch is reported as such, not as an unreadable file
        try:
            saved = dict(_load(folder / "model_config.pt"))
        except Exception as e:  # a courtesy check: every tensor's shape is checked anyway
            get_logger().warning(f"{folder / 'model_config.pt'}: not readable with weights_only ({e}); not checked")
    return _Files(files, tp, wp, pp, isp, saved)


def check_internevo(folder: str | Path, model: ml_collections.ConfigDict) -> None:
    """Cheap checks of an InternEvo step folder before anything is compiled: every shard file is there and
    ``model_config.pt`` (when present) agrees with the ``model`` section. No tensor is read."""
    _check_saved(_internevo_files(Path(folder)), model, Path(folder) / "model_config.pt")


def _check_saved(found: _Files, model: ml_collections.ConfigDict, where: Path) -> None:
    """``ConfigError`` naming every ``model.*`` key that disagrees with InternEvo's ``model_config.pt``."""
    saved, bad, fix = found.saved or {}, [], []
    for key in _SAVED_KEYS:
        theirs, ours = saved.get(key), model[key]
        if theirs is not None and not (math.isclose(ours, theirs) if isinstance(theirs, float) else ours == theirs):
            bad.append(f"model.{key}={ours!r} but {where} has {theirs!r}")
            fix.append(f"--config.model.{key}={theirs!r}")
    if "mlp_ratio" in saved and "hidden_size" in saved:
        theirs = ffn_width(saved["hidden_size"], saved["mlp_ratio"], saved.get("multiple_of", 256))
        if theirs != ffn_width(model.hidden_size, model.mlp_ratio, model.multiple_of):
            bad.append(f"an FFN width other than the {theirs} of {where}")
            fix.append(f"--config.model.mlp_ratio={saved['mlp_ratio']!r}")
    if bad:
        raise ConfigError(
            "the config and the InternEvo checkpoint disagree:\n  " + "\n  ".join(bad) + "\nfix: " + " ".join(fix)
        )


def _layer_offsets(found: _Files, model: ml_collections.ConfigDict, folder: Path) -> dict[tuple[int, int], int]:
    """``(chunk, stage) -> global index of its first layer``. Stages hold consecutive layers, chunk by chunk
    (M-15); the counts come from the keys of one file per stage (mapped: no tensor data is read)."""
    counts = {}
    for p in range(found.pp):
        path = min(f for k, f in found.files.items() if k[2] == p)
        ids: dict[int, set[int]] = defaultdict(set)
        for name in _load(path):
            if (parsed := _parse(name)) and parsed[3] is not None:
                ids[parsed[0]].add(parsed[3])
        for chunk, local in ids.items():
            if local != set(range(len(local))):
                raise CheckpointError(f"{path}: layer indices {sorted(local)} of chunk {chunk} are not 0..n-1")
            counts[(chunk, p)] = len(local)
    offsets, total = {}, 0
    for key in sorted(counts):
        offsets[key], total = total, total + counts[key]
    if total != model.num_layers:
        raise ConfigError(
            f"{folder}: the checkpoint holds {total} layers in {found.pp} pipeline stages, the config has "
            f"model.num_layers={model.num_layers}; set --config.model.num_layers={total}"
        )
    return offsets


def _embed_hidden(folder: Path, model: ml_collections.ConfigDict) -> bool:
    """Whether the embedding is split on the hidden dim (a tie-break: shard shapes decide unless vocab == hidden):
    the ``topo_*.json`` files (``{module: {"dim": d}}``) when they say, else ``model.embed_split_hidden``."""
    for topo in sorted(folder.glob("topo_*.json")):
        try:
            dims = json.loads(topo.read_text())
        except (OSError, ValueError):
            continue
        for module, value in dims.items() if isinstance(dims, dict) else ():
            if "embedding" in module and isinstance(value, dict) and "dim" in value:
                return value["dim"] == 1
    return bool(model.embed_split_hidden)


def load_internevo(folder: str | Path, model: ml_collections.ConfigDict) -> dict[str, Any]:
    """An InternEvo step folder (``model_tp{t}_pp{p}.pt`` ...) -> our params (numpy, the checkpoint's dtype),
    checked against the ``model`` section (``model_config.pt``, every tensor's shape, the layer count)."""
    folder = Path(folder)
    found = _internevo_files(folder)
    _check_saved(found, model, folder / "model_config.pt")
    offsets = _layer_offsets(found, model, folder)
    asm = _Assembler(model, str(folder), _embed_hidden(folder, model), found.isp)
    for (t, w, p), path in sorted(found.files.items(), key=lambda x: x[0][::-1]):
        for name, a in _tensors(path):
            if (parsed := _parse(name)) is None:
                continue
            chunk, role, param, i = parsed
            if role == "?":
                raise _unknown(f"{path}: tensor {name!r}")
            # isp: block linears split over the weight-parallel group, embedding/head over tp (or wp when the
            # files name no tp); otherwise everything over tp.
            by_w = found.isp and (i is not None or found.tp == 1)
            layer = None if i is None else offsets[(chunk, p)] + i
            asm.place(f"{path}: tensor {name!r}", role, param, layer, a, *((w, found.wp) if by_w else (t, found.tp)))
    # The stored RoPE layout: InternLM1's is half-split; else model_config.pt's qk_interleaved / adapt_hf, else
    # the config's own (InternEvo's per-model defaults are ours).
    saved = found.saved or {}
    stored = bool(model.qk_interleaved)
    if "Wqkv" in asm.roles:
        stored = False
    elif saved.get("qk_interleaved") is not None:
        stored = bool(saved["qk_interleaved"])
    elif saved.get("adapt_hf") is not None:
        stored = not saved["adapt_hf"]
    return asm.finish(stored)


# ---------------------------------------------------------------------------------------------------------------------
# Meta's consolidated Llama weights


def is_llama_folder(path: str | Path) -> bool:
    """Meta's layout: ``params.json`` and ``consolidated.00.pth``."""
    return (Path(path) / "params.json").is_file() and (Path(path) / "consolidated.00.pth").is_file()


def check_llama(folder: str | Path, model: ml_collections.ConfigDict) -> list[Path]:
    """``params.json`` against the ``model`` section, before anything is compiled; returns the shard files."""
    folder = Path(folder)
    where = folder / "params.json"
    if not where.is_file():
        raise CheckpointError(f"{folder}: no params.json; is this a folder of Meta's consolidated Llama weights?")
    params = json.loads(where.read_text())
    if params.get("use_scaled_rope"):
        raise ConfigError(f"{where}: use_scaled_rope (Llama 3.1's RoPE scaling) is not implemented")
    numbered = {int(m[1]): folder / m[0] for f in folder.iterdir() if (m := _META_FILE.fullmatch(f.name))}
    files = [numbered.get(i) for i in range(max(numbered, default=-1) + 1)]
    if not files or None in files:
        raise CheckpointError(f"{folder}: consolidated.NN.pth files missing; found {sorted(numbered) or 'none'}")
    # Meta's FFN width: multiple_of-rounded ffn_dim_multiplier * int(8 * dim / 3)
    ffn, multiple = int(2 * 4 * params["dim"] / 3), params.get("multiple_of", 256)
    ffn = int(params["ffn_dim_multiplier"] * ffn) if params.get("ffn_dim_multiplier") else ffn
    as_hf = dict(
        architectures=[convert.LLAMA],
        hidden_size=params["dim"],
        intermediate_size=multiple * ((ffn + multiple - 1) // multiple),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        # Llama 2 writes vocab_size=-1 (the tokenizer decides); the embedding's shape is checked instead
        vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else model.vocab_size,
        rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=model.max_position_embeddings,  # not fixed by Meta's files
        attention_bias=False,
    )
    convert.check_config(as_hf, model, str(where), what="Meta's params.json")
    return files


def load_llama(folder: str | Path, model: ml_collections.ConfigDict) -> dict[str, Any]:
    """Meta's ``consolidated.{NN}.pth`` + ``params.json`` -> our params (numpy, the checkpoint's dtype).

    The files are model-parallel shards: the embedding split on dim 1 (Llama 3's vocab-parallel one on dim 0, told
    apart by shape), wq/wk/wv/w1/w3/output on dim 0, wo/w2 on dim 1, norms replicated. Meta's q/k channels are
    interleaved (our LLAMA2 default); a config with ``qk_interleaved=False`` gets them permuted to half-split.
    """
    folder = Path(folder)
    files = check_llama(folder, model)
    asm = _Assembler(model, str(folder), embed_hidden=True)
    for shard, path in enumerate(files):
        for name, a in _tensors(path):
            if (parsed := _parse(name)) is None:
                continue
            chunk, role, param, i = parsed
            if role == "?" or chunk:
                raise _unknown(f"{path}: tensor {name!r}")
            asm.place(f"{path}: tensor {name!r}", role, param, i, a, shard, len(files))
    return asm.finish(stored_interleaved=True)
