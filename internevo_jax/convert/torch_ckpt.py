"""Readers of PyTorch checkpoints: InternEvo step folders (reference CK-01) and Meta's consolidated Llama weights.

Both return our pure-dict params (numpy, in the checkpoint's dtype or one asked for), the tree ``hf_folder.load_hf``
returns, so the Trainer and ``tools/convert_checkpoint.py`` treat every source alike. Model weights only: optimizer
and sampler states of another framework do not carry over.

InternEvo saves one ``torch.save`` state dict per rank (``model_tp{t}_pp{p}.pt``; under isp
``model_tp{t}_wp{w}_pp{p}.pt`` or ``model_wp{w}_pp{p}.pt``) holding local shards, with layer indices local to the
pipeline stage (behind a ``{chunk}.`` prefix with interleaved pipelines); an INTERNLM_MoE model adds one
``model_moe_layer{L}_expert{E}_tp{t}.pt`` per expert (global layer and expert ids). This module finds and checks
those files and reads them one (memory-mapped) file at a time; Meta's ``consolidated.{NN}.pth`` (model-parallel
shards with InternEvo-Llama names) are found in ``meta_llama.py`` and read here too. What each tensor name means and
where each shard's piece lands in our arrays (the merge rules) is ``torch_shards.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from internevo_jax.config import ConfigError, ffn_width
from internevo_jax.convert import hf_layout
from internevo_jax.convert.torch_shards import Assembler, parse, parse_expert, unknown
from internevo_jax.errors import CheckpointError
from internevo_jax.monitoring.logger import get_logger

_MODEL_FILE = re.compile(r"model(?:_tp(?P<t>\d+))?(?:_wp(?P<w>\d+))?_pp(?P<p>\d+)(?:_dp(?P<d>\d+))?\.pt")
_EXPERT_FILE = re.compile(r"model_moe_layer(?P<L>\d+)_expert(?P<E>\d+)_tp(?P<t>\d+)\.pt")
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


def _inventory(paths: list[Path]) -> tuple[int | None, int | None]:
    """``(tensors, bytes)`` the files hold, for a progress bar: memory-mapped loads read no tensor data. ``(None,
    None)`` when a file cannot be mapped (the legacy format: counting would read it all)."""
    torch, count, nbytes = _torch(), 0, 0
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None, None
        tensors = [t for name, t in state.items() if not name.endswith("_extra_state") and isinstance(t, torch.Tensor)]
        count += len(tensors)
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
    return count, nbytes


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


# ---------------------------------------------------------------------------------------------------------------------
# InternEvo step folders


class _Files(NamedTuple):
    files: dict[tuple[int, int, int], Path]  # (tp rank, wp rank, pp rank) -> file
    tp: int
    wp: int
    pp: int
    isp: bool
    saved: dict[str, Any] | None  # model_config.pt (InternEvo's ``model`` section), when readable
    experts: dict[tuple[int, int, int], Path]  # MoE: (global layer, global expert, tp rank) -> file


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
    files, isp, experts = {}, False, {}
    for f in sorted(folder.iterdir()):
        if m := _EXPERT_FILE.fullmatch(f.name):
            experts[(int(m["L"]), int(m["E"]), int(m["t"]))] = f
            continue
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
    return _Files(files, tp, wp, pp, isp, saved, experts)


def check_internevo(folder: str | Path, model: ml_collections.ConfigDict) -> None:
    """Cheap checks of an InternEvo step folder before anything is compiled: every shard file is there and
    ``model_config.pt`` (when present) agrees with the ``model`` section. No tensor is read."""
    found = _internevo_files(Path(folder))
    _check_saved(found, model, Path(folder) / "model_config.pt")
    _check_experts(found, model, Path(folder))


def _check_experts(found: _Files, model: ml_collections.ConfigDict, folder: Path) -> None:
    """MoE (CK-01): one ``model_moe_layer{L}_expert{E}_tp{t}.pt`` per global layer, expert and TP rank; expert
    files with a dense config (or none with an MoE one) are a config mismatch."""
    experts = model.get("num_experts", 1)
    if experts == 1:
        if found.experts:
            raise ConfigError(
                f"{folder}: holds MoE expert files (model_moe_layer*_expert*_tp*.pt) but the config is a dense model; "
                "set model_type='INTERNLM_MoE' and model.num_experts to the checkpoint's expert count"
            )
        return
    extra = sorted(k for k in found.experts if k[0] >= model.num_layers or k[1] >= experts or k[2] >= found.tp)
    if extra:
        L, E, t = extra[0]
        raise ConfigError(
            f"{folder}: model_moe_layer{L}_expert{E}_tp{t}.pt lies outside the config's model.num_layers="
            f"{model.num_layers}, model.num_experts={experts} and the tp={found.tp} of the model_tp*_pp*.pt files; "
            "set them to the checkpoint's"
        )
    grid = itertools.product(range(model.num_layers), range(experts), range(found.tp))
    missing = [
        f"model_moe_layer{L}_expert{E}_tp{t}.pt (layer {L}, expert {E}, tp rank {t})"
        for L, E, t in grid
        if (L, E, t) not in found.experts
    ]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(
            f"{folder}: MoE expert files missing: {'; '.join(missing[:4])}{more} (model.num_experts={experts}, "
            f"model.num_layers={model.num_layers}); copy every model_moe_layer*_expert*_tp*.pt of the step folder"
        )


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
            if (parsed := parse(name)) and parsed[3] is not None:
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


def parsed_tensors(
    files: list[tuple[Any, Path]], what: str, progress: hf_layout.Progress | None
) -> Iterator[tuple[tuple[Any, Path], str, tuple[int, str, str, int | None], np.ndarray]]:
    """Every known tensor of ``files`` (``(key, path)`` pairs, read one file at a time) with its parsed name; buffers
    that are recomputed (RoPE) are skipped, an unknown name is an error naming the file."""
    if progress is not None:
        progress.start(f"reading {what} tensors", *_inventory([path for _, path in files]))
    for entry in files:
        path = entry[1]
        for name, a in _tensors(path):
            if progress is not None:
                progress.advance(a.nbytes)
            if (parsed := parse(name)) is None:
                continue
            if parsed[1] == "?":
                raise unknown(f"{path}: tensor {name!r}")
            yield entry, name, parsed, a


def load_internevo(
    folder: str | Path, model: ml_collections.ConfigDict, dtype: Any = None, progress: hf_layout.Progress | None = None
) -> dict[str, Any]:
    """An InternEvo step folder (``model_tp{t}_pp{p}.pt`` ...) -> our params (numpy, ``dtype`` or the
    checkpoint's), checked against the ``model`` section (``model_config.pt``, every tensor's shape, the layer
    count). ``progress`` hears of every tensor read."""
    folder = Path(folder)
    found = _internevo_files(folder)
    _check_saved(found, model, folder / "model_config.pt")
    _check_experts(found, model, folder)
    offsets = _layer_offsets(found, model, folder)
    asm = Assembler(model, str(folder), _embed_hidden(folder, model), found.isp, dtype)
    files = sorted(found.files.items(), key=lambda x: x[0][::-1])
    for ((t, w, p), path), name, (chunk, role, param, i), a in parsed_tensors(files, "InternEvo", progress):
        # isp: block linears split over the weight-parallel group, embedding/head over tp (or wp when the files
        # name no tp); otherwise everything over tp.
        by_w = found.isp and (i is not None or found.tp == 1)
        layer = None if i is None else offsets[(chunk, p)] + i
        asm.place(f"{path}: tensor {name!r}", role, param, layer, a, *((w, found.wp) if by_w else (t, found.tp)))
    # MoE experts: the file name gives the global layer and expert; the names inside carry the stage-local layer
    expert_files = sorted(found.experts.items())
    if expert_files and progress is not None:
        progress.start("reading InternEvo expert tensors", *_inventory([path for _, path in expert_files]))
    for (layer, expert, t), path in expert_files:
        for name, a in _tensors(path):
            if progress is not None:
                progress.advance(a.nbytes)
            if (parsed := parse_expert(name)) is None:
                raise unknown(f"{path}: tensor {name!r}")
            if parsed[0] != expert:
                raise CheckpointError(f"{path}: tensor {name!r} is of expert {parsed[0]}, the file name says {expert}")
            asm.place(f"{path}: tensor {name!r}", parsed[1], "weight", layer, a, t, found.tp, expert=expert)
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
