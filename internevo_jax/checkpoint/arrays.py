"""Reading and checking a step folder's arrays by name (no orbax manager): the saved shapes against a target, arrays
onto the current mesh or as numpy, and the step's meta item. Names are tree paths joined by ".", which is also the
folder orbax gives each array (``state/<name>/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from internevo_jax.errors import CheckpointError, CheckpointMismatch


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (restore places arrays straight onto the current mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------------------------------------------
# Reading step folders by array name. Names are the tree paths joined by "." (dict keys, NamedTuple fields and
# sequence indices), which is also the folder name orbax gives each array: ``state/<name>/``.


def array_names(tree: Any) -> dict[str, Any]:
    """``{"params.layers.attention.wqkv": leaf, "opt_state.inner_state.0.mu....": leaf, ...}`` in leaf order."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _path_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def saved_arrays(step_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{array name: (shape, dtype)}`` of a step folder, from orbax's metadata (no array data is read)."""
    metadata = ocp.PyTreeCheckpointHandler(use_ocdbt=False).metadata(_epath(step_dir / "state"))
    tree = getattr(metadata, "tree", metadata)
    return {name: (tuple(m.shape), str(np.dtype(m.dtype))) for name, m in array_names(tree).items()}


def check_fits(step_dir: Path, wanted: dict[str, Any], expected: dict[str, Any] | None = None) -> None:
    """Raises ``CheckpointMismatch`` naming every array of ``wanted`` that is missing or has another shape.

    Also lists saved arrays that the config has no place for (not in ``expected``, the whole target state) under the
    same top-level names as ``wanted`` (a model with biases loaded into one without, say). Cheap: metadata only.
    """
    try:
        saved = saved_arrays(step_dir)
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot read the checkpoint's array metadata ({e})") from e
    expected = wanted if expected is None else expected
    bad = []
    for name, want in wanted.items():
        shape, dtype = tuple(want.shape), np.dtype(want.dtype).name
        if name not in saved:
            bad.append(f"{name}: not in the checkpoint (the config expects {shape} {dtype})")
        elif saved[name][0] != shape:
            bad.append(f"{name}: saved {saved[name][0]} {saved[name][1]}, the config expects {shape} {dtype}")
    tops = {name.split(".")[0] for name in wanted}
    bad += [
        f"{name}: saved {shape} {dtype}, the config has no such array"
        for name, (shape, dtype) in saved.items()
        if name not in expected and name.split(".")[0] in tops
    ]
    if bad:
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise CheckpointMismatch(
            f"checkpoint {step_dir} does not fit the config: " + "; ".join(bad[:8]) + more + _model_diff(step_dir)
        )


def _model_diff(step_dir: Path) -> str:
    """`` (saved with model.x=..., ...)``: the model section the checkpoint was written with, when it is known."""
    try:
        saved = json.loads(read_meta(step_dir)["config"])
    except Exception:
        return ""
    model = ", ".join(f"model.{k}={v!r}" for k, v in sorted(saved.get("model", {}).items()) if k in _SHAPE_KEYS)
    return f". It was written with model_type={saved.get('model_type')!r}, {model}: make the config match"


_SHAPE_KEYS = (
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_attention_heads",
    "mlp_ratio",
    "multiple_of",
    "vocab_size",
    "no_bias",
)


def read_arrays(step_dir: Path, targets: dict[str, Any]) -> dict[str, jax.Array]:
    """Restores the arrays named in ``targets`` (ShapeDtypeStructs with shardings) from ``step_dir``.

    Each array goes straight into its target sharding, whatever mesh saved it; the others are not read.
    """
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    state_dir = _epath(step_dir / "state")
    metadata = handler.metadata(state_dir)
    tree = getattr(metadata, "tree", metadata)
    item = jax.tree_util.tree_map_with_path(lambda path, _: targets.get(_path_name(path), ocp.PLACEHOLDER), tree)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.Checkpointer(handler) as checkpointer:
        out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    return {name: a for name, a in array_names(out).items() if name in targets}


def read_numpy(step_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of ``step_dir`` as host numpy arrays, as saved (no device, no copy through jax)."""
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    state_dir = _epath(step_dir / "state")
    metadata = handler.metadata(state_dir)
    tree = getattr(metadata, "tree", metadata)
    wanted = set(names)

    def pick(make: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: make() if _path_name(p) in wanted else ocp.PLACEHOLDER, tree
        )

    item = pick(lambda: np.empty(0))
    restore_args = pick(lambda: ocp.RestoreArgs(restore_type=np.ndarray))
    with ocp.Checkpointer(handler) as checkpointer:
        out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    return {name: a for name, a in array_names(out).items() if name in wanted}


def read_meta(step_dir: Path) -> dict[str, Any]:
    """The step's JSON item: counters, data-iterator state and the resolved config (as JSON text)."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(_epath(step_dir / "meta"), args=ocp.args.JsonRestore())


def _epath(path: Path) -> Any:
    from etils import epath  # orbax's path type (a dependency of orbax)

    return epath.Path(path)
