"""Reading one of our checkpoints outside a training run: the config it was saved with and its params by name.

The converter (``tools/convert_checkpoint.py``) and ``generate`` read step folders without a train state; this module is
where the saved config's JSON is turned back into config values and where the params' array names
(``params.<path>``) are built, so all of them agree on both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from internevo_jax.checkpoint.arrays import array_names, check_fits, read_arrays, read_meta, read_numpy
from internevo_jax.errors import CheckpointError


def saved_config(step_dir: Path) -> dict[str, Any]:
    """The config a step folder was saved with, as plain values (``config.to_json`` inverted: its ``"inf"`` strings
    back to floats); raises ``CheckpointError`` when the meta item holds none."""
    try:
        saved = json.loads(read_meta(step_dir)["config"])
    except Exception as e:
        raise CheckpointError(f"{step_dir} holds no readable config ({e})") from e
    return _decode(saved)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return float(value) if value in ("inf", "-inf") else value


def param_targets(abstract_params: Any, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
    """``{"params.<path>": ShapeDtypeStruct}`` for a pure params tree (the names a step folder stores them under)."""
    return {
        f"params.{name}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
        for name, a in array_names(abstract_params).items()
    }


def read_params(step_dir: Path, abstract_params: Any, sharding: jax.sharding.Sharding) -> Any:
    """The params of a step folder as arrays placed by ``sharding``, in ``abstract_params``'s tree; the saved names
    and shapes are checked against it first (``CheckpointMismatch`` names every difference)."""
    targets = param_targets(abstract_params, sharding)
    check_fits(step_dir, targets)
    arrays = read_arrays(step_dir, targets)
    return jax.tree.unflatten(jax.tree.structure(abstract_params), [arrays[name] for name in targets])


class SavedArray:
    """One array of a step folder, read when numpy asks for it (``np.asarray``) and not kept: an export reads each
    array once, converts it and lets it go (``hf_layout.hf_tensors``)."""

    def __init__(self, step_dir: Path, name: str, shape: tuple[int, ...], dtype: Any):
        self.step_dir, self.name, self.shape, self.dtype = step_dir, name, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(read_numpy(self.step_dir, [self.name])[self.name], dtype or self.dtype)


def lazy_params(step_dir: Path, abstract_params: Any) -> Any:
    """The params of a step folder as ``SavedArray`` leaves (nothing read yet), checked by name and shape first."""
    targets = param_targets(abstract_params)
    check_fits(step_dir, targets)
    leaves = [SavedArray(step_dir, name, a.shape, a.dtype) for name, a in targets.items()]
    return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)
