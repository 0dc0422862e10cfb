"""The device mesh, the one logical-axis rules table, and the shardings derived from them.

InternEvo's process groups become mesh axes (outer to inner, so the innermost sit on NVLink):
``pipeline, data, fsdp, sequence, tensor``. Model code names tensor dimensions logically (``"embed"``,
``"mlp"``, ``"act_batch"``...); ``rules()`` maps those names to mesh axes for a given ``parallel`` section.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internevo_jax.config import ConfigError

AXES = ("pipeline", "data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a global batch row is split over

Rules = dict[str, Any]


def mesh_shape(parallel: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes of the mesh axes for a ``parallel`` section on ``num_devices`` devices; errors show the arithmetic."""
    tensor, pipeline = parallel.tensor.size, parallel.pipeline.size
    mode = parallel.tensor.mode
    if pipeline > 1:
        raise ConfigError("parallel.pipeline.size > 1: pipeline parallelism is not implemented yet (issue #6)")
    if mode == "isp":
        raise ConfigError("parallel.tensor.mode='isp': sequence parallelism is not implemented yet (issue #6)")
    if num_devices % (pipeline * tensor):
        raise ConfigError(
            f"world {num_devices} is not divisible by pipeline {pipeline} x tensor {tensor} = {pipeline * tensor}"
        )
    dp = num_devices // (pipeline * tensor)
    fsdp = 1
    if parallel.zero1.fsdp:
        fsdp = dp if parallel.zero1.size == -1 else parallel.zero1.size
    elif parallel.zero1.size not in (-1, 1, dp):
        raise ConfigError(
            f"parallel.zero1.size={parallel.zero1.size}: ZeRO groups smaller than the data-parallel size {dp} "
            "are not implemented yet (issue #6); use -1 (all) or 1 (none)"
        )
    if dp % fsdp:
        raise ConfigError(
            f"data-parallel size {dp} (world {num_devices} / pipeline {pipeline} / tensor {tensor}) "
            f"is not divisible by the FSDP group size parallel.zero1.size={fsdp}"
        )
    return dict(pipeline=pipeline, data=dp // fsdp, fsdp=fsdp, sequence=1, tensor=tensor)


def make_mesh(parallel: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(pipeline, data, fsdp, sequence, tensor)`` mesh for a ``parallel`` section."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(parallel, len(devices))
    grid = np.asarray(devices).reshape([shape[a] for a in AXES])
    return Mesh(grid, AXES)


def rules(parallel: ml_collections.ConfigDict) -> Rules:
    """The logical-name -> mesh-axis table for one ``parallel`` section.

    Params use plain names; activations use ``act_*`` names, so FSDP can shard a weight's ``embed`` dim while the
    activations' embed dim stays whole (Levanter's split of parameter and compute placement).
    """
    seq_sharded = parallel.tensor.mode in ("msp", "fsp") and parallel.tensor.size > 1
    fsdp_params = bool(parallel.zero1.fsdp)
    return {
        # parameters
        "layers": None,
        "vocab": "tensor",
        "embed": "fsdp" if fsdp_params else None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "qkv": None,
        "head_dim": None,
        "mlp": "tensor",
        "norm": None,
        # activations
        "act_batch": BATCH_AXES,
        "act_length": "tensor" if seq_sharded else None,
        "act_embed": None,
        "act_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    }


def spec(names: Sequence[str | None], table: Rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names (None stays unsharded)."""
    return PartitionSpec(*(None if n is None else table[n] for n in names))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("internevo_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, table: Rules) -> Iterator[None]:
    """Makes ``constrain`` effective while tracing inside this block."""
    token = _ACTIVE.set((mesh, table))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op without an active mesh (tests, single device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, table = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit(spec(names, table), x.shape, mesh)))


def _fit(pspec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. 4 KV heads on tensor 8 stay replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, table: Rules) -> dict:
    """NamedShardings for a model's params, as a pure dict matching ``nnx.to_pure_dict(state)``."""

    def one(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("axes")
        if names is None:
            raise ValueError(f"parameter of shape {var.get_value().shape} has no logical axis names")
        return NamedSharding(mesh, _fit(spec(names, table), var.get_value().shape, mesh))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def zero1_sharding(param: NamedSharding, shape: Sequence[int], zero1_size: int) -> NamedSharding:
    """Optimizer-state sharding for ZeRO-1: the param's own spec plus the ``data`` axis on a free, divisible dim."""
    mesh = param.mesh
    if zero1_size == 1 or mesh.shape["data"] == 1:
        return param
    entries = list(tuple(param.spec) + (None,) * (len(shape) - len(param.spec)))
    for i, (dim, axes) in enumerate(zip(shape, entries, strict=True)):
        used = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in used) * mesh.shape["data"]
        if "data" not in used and dim % size == 0:
            entries[i] = tuple(used) + ("data",) if used else "data"
            return NamedSharding(mesh, PartitionSpec(*entries))
    return param  # too small to split: replicated, as InternEvo keeps whole params on one ZeRO rank


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a global batch array ``[micro_num, rows, packed_length]``: rows over the data axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
