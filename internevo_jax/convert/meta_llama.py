"""Meta's consolidated Llama weights (``params.json`` + ``consolidated.{NN}.pth``): the folder check against our
``model`` section and the reader. The files are read by ``torch_ckpt.parsed_tensors`` (InternEvo-Llama tensor names)
and merged by ``torch_shards.Assembler``, as InternEvo's step folders are."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_collections

from internevo_jax.convert import hf_config, hf_layout
from internevo_jax.convert.torch_ckpt import parsed_tensors
from internevo_jax.convert.torch_shards import Assembler, unknown
from internevo_jax.errors import CheckpointError

_META_FILE = re.compile(r"consolidated\.(\d+)\.pth")

# ``use_scaled_rope: true`` in Meta's params.json: the values Meta's reference code (``apply_scaling``) hard-codes,
# as an HF ``rope_scaling`` table (a ``rope_scaling_factor`` in params.json replaces the factor).
META_SCALED_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


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
    numbered = {int(m[1]): folder / m[0] for f in folder.iterdir() if (m := _META_FILE.fullmatch(f.name))}
    if not numbered or sorted(numbered) != list(range(len(numbered))):  # none, or a gap in 00, 01, ...
        raise CheckpointError(f"{folder}: consolidated.NN.pth files missing; found {sorted(numbered) or 'none'}")
    files = [numbered[i] for i in range(len(numbered))]
    # Meta's FFN width: multiple_of-rounded ffn_dim_multiplier * int(8 * dim / 3)
    ffn, multiple = int(2 * 4 * params["dim"] / 3), params.get("multiple_of", 256)
    ffn = int(params["ffn_dim_multiplier"] * ffn) if params.get("ffn_dim_multiplier") else ffn
    as_hf = dict(
        architectures=[hf_config.LLAMA],
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
    if params.get("use_scaled_rope"):  # Llama 3.1+: the llama3 scaling, with the constants of Meta's apply_scaling
        as_hf["rope_scaling"] = dict(META_SCALED_ROPE, factor=float(params.get("rope_scaling_factor", 8.0)))
    hf_config.check_config(as_hf, model, str(where), what="Meta's params.json")
    return files


def load_llama(
    folder: str | Path, model: ml_collections.ConfigDict, dtype: Any = None, progress: hf_layout.Progress | None = None
) -> dict[str, Any]:
    """Meta's ``consolidated.{NN}.pth`` + ``params.json`` -> our params (numpy, the checkpoint's dtype).

    The files are model-parallel shards: the embedding split on dim 1 (Llama 3's vocab-parallel one on dim 0, told
    apart by shape), wq/wk/wv/w1/w3/output on dim 0, wo/w2 on dim 1, norms replicated. Meta's q/k channels are
    interleaved (our LLAMA2 default); a config with ``qk_interleaved=False`` gets them permuted to half-split.
    Arrays come in ``dtype`` (default: the checkpoint's); ``progress`` hears of every tensor read.
    """
    folder = Path(folder)
    files = check_llama(folder, model)
    asm = Assembler(model, str(folder), embed_hidden=True, dtype=dtype)
    for (shard, path), name, (chunk, role, param, i), a in parsed_tensors(list(enumerate(files)), "Meta", progress):
        if chunk:
            raise unknown(f"{path}: tensor {name!r}")
        asm.place(f"{path}: tensor {name!r}", role, param, i, a, shard, len(files))
    return asm.finish(stored_interleaved=True)
