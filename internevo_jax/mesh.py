"""The device mesh, the one logical-axis rules table, and the shardings derived from them.

InternEvo's process groups become mesh axes (outer to inner, so the innermost sit on NVLink):
``pipeline, data, fsdp, weight, sequence, tensor``. Model code names tensor dimensions logically (``"embed"``,
``"mlp"``, ``"act_batch"``...); ``rules()`` maps those names to mesh axes for a given ``parallel`` section.

The data-parallel ranks are ``data x fsdp x expert x weight``: ``fsdp`` is the ZeRO group, and ``weight`` is the
part of isp's weight-parallel group that lies outside the sequence group (``weight.size / sequence``), so that the
weight group, ``weight x sequence``, is ``weight.size`` contiguous ranks as in InternEvo (P-07), and ``data x fsdp``
is its weight-data-parallel group (WDP, ranks strided by ``weight.size``) over which ZeRO runs. ``expert`` is
InternEvo's expert-parallel group of a MoE model (P-10): ``ep = min(dp, num_experts)`` data-parallel ranks that hold
different experts (1 for a dense model); the MoE layer's tokens travel to their experts' ranks and back by
all-to-all over it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internevo_jax.config import ConfigError

AXES = ("pipeline", "data", "fsdp", "expert", "weight", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp", "expert", "weight")  # the axes a global batch row is split over
WEIGHT_GROUP = ("weight", "sequence")  # isp's weight-parallel group: block weights are sharded over it

Rules = dict[str, Any]


def mesh_shape(parallel: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes of the mesh axes for a ``parallel`` section on ``num_devices`` devices; errors show the arithmetic.

    ``tensor.size`` is the ``tensor`` axis for mtp/msp/fsp and the ``sequence`` axis for isp (InternEvo's isp uses
    the tensor group as its sequence-parallel group). With isp, ``weight.size`` ranks (a multiple of the sequence
    size) form the weight group: ``sequence x weight``, the ``weight`` axis taking ``weight.size / sequence`` of the
    data-parallel ranks. The data-parallel rest is then split into ``data x fsdp``, where ``fsdp`` is the ZeRO group:
    the optimizer state is sharded over it (ZeRO-1), and the params too with ``zero1.fsdp=True``.
    """
    tensor, pipeline, mode = parallel.tensor.size, parallel.pipeline.size, parallel.tensor.mode
    if num_devices % (pipeline * tensor):
        raise ConfigError(
            f"world {num_devices} is not divisible by pipeline {pipeline} x tensor {tensor} = {pipeline * tensor}"
        )
    dp = num_devices // (pipeline * tensor)
    sequence = tensor if mode == "isp" else 1
    weight = _weight_axis(parallel.weight.size, sequence, num_devices, pipeline)
    expert = expert_parallel_size(parallel, dp // weight)
    wdp = dp // weight // expert  # InternEvo's weight-data-parallel size (= dp without weight/expert parallelism)
    zero = wdp if parallel.zero1.size == -1 else parallel.zero1.size
    if wdp % zero:
        group = (
            f"weight-data-parallel size {wdp} (world {num_devices} / pipeline {pipeline} / weight "
            f"{parallel.weight.size})"
            if weight > 1
            else f"data-parallel size {dp} (world {num_devices} / pipeline {pipeline} / tensor {tensor})"
        )
        raise ConfigError(
            f"parallel.zero1.size={zero} does not divide the {group}; use -1 (all), 1 (none) or a divisor"
        )
    return dict(
        pipeline=pipeline,
        data=wdp // zero,
        fsdp=zero,
        expert=expert,
        weight=weight,
        sequence=sequence,
        tensor=tensor // sequence,
    )


def expert_parallel_size(parallel: ml_collections.ConfigDict, dp: int) -> int:
    """InternEvo's expert-parallel size (P-10): ``parallel.expert.size``, where -1 means ``min(dp, num_experts)``;
    it and the experts must divide one another's counts (1 for a dense model)."""
    experts = parallel.expert.get("num_experts") or 1  # a hand-made section without it: dense
    if experts <= 1:
        return 1
    ep = min(dp, experts) if parallel.expert.size == -1 else parallel.expert.size
    if dp % ep or experts % ep:
        raise ConfigError(
            f"expert-parallel size {ep} must divide the data-parallel size {dp} and model.num_experts {experts}; "
            f"set parallel.expert.size to a common divisor (-1: min(dp, num_experts) = {min(dp, experts)})"
        )
    return ep


def _weight_axis(size: int, sequence: int, num_devices: int, pipeline: int) -> int:
    """The ``weight`` axis for ``parallel.weight.size``: how many data-parallel ranks the weight group spans.

    InternEvo's weight groups are ``size`` contiguous ranks of a pipeline stage; on the mesh they are whole sequence
    groups times a block of data-parallel ranks, so ``size`` must be a multiple of the sequence size dividing the
    stage. (InternEvo also allows a weight group inside the sequence group, e.g. sequence 4 x weight 2; not here.)
    """
    if size == 1:
        return 1
    stage = num_devices // pipeline
    valid = [1] + [k for k in range(sequence, stage + 1, sequence) if stage % k == 0]
    if size % sequence or stage % size:
        raise ConfigError(
            f"parallel.weight.size={size}: the weight group is the isp group (sequence size {sequence} = "
            f"parallel.tensor.size) times a block of data-parallel ranks, so it must be a multiple of {sequence} that "
            f"divides world {num_devices} / pipeline {pipeline} = {stage} ranks per stage; set parallel.weight.size "
            f"to one of {valid}"
        )
    return size // sequence


def make_mesh(parallel: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(pipeline, data, fsdp, weight, sequence, tensor)`` mesh for a ``parallel`` section."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(parallel, len(devices))
    grid = np.asarray(devices).reshape([shape[a] for a in AXES])
    return Mesh(grid, AXES)


def rules(parallel: ml_collections.ConfigDict) -> Rules:
    """The logical-name -> mesh-axis table for one ``parallel`` section.

    Params use plain names; activations use ``act_*`` names, so FSDP can shard a weight's ``embed`` dim while the
    activations' embed dim stays whole (Levanter's split of parameter and compute placement). The four tensor modes:
    mtp shards heads, MLP width and vocab over ``tensor``; msp/fsp also shard the activations' length between
    blocks; isp shards the length over ``sequence`` and, inside attention, the heads instead (XLA turns the switch
    into all-to-alls: Ulysses), with weights sharded over the weight group (``weight x sequence``) when
    ``weight.size > 1``, gathered per use by XLA (InternEvo's just-in-time all-gather).
    """
    mode, tp = parallel.tensor.mode, parallel.tensor.size
    isp = mode == "isp" and tp > 1
    embed: tuple[str, ...] = ("fsdp",) if parallel.zero1.fsdp else ()
    if mode == "isp" and parallel.weight.size > 1:
        embed += WEIGHT_GROUP
    return {
        # parameters
        "layers": "pipeline" if parallel.pipeline.size > 1 else None,
        "vocab": "tensor",
        "embed": embed or None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "qkv": None,
        "head_dim": None,
        "mlp": "tensor",
        "norm": None,
        "expert": "expert",  # MoE: the stacked experts, over the expert-parallel ranks
        "expert_mlp": "tensor",  # an expert's MLP width, over tensor as the dense MLP's
        "expert_gate": None,  # the router's E outputs (every rank routes its own tokens)
        # activations
        "act_batch": BATCH_AXES,
        "act_length": "sequence" if isp else ("tensor" if mode in ("msp", "fsp") and tp > 1 else None),
        "act_embed": None,
        "act_heads": "sequence" if isp else "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
        # the MoE dispatch buffers [B, E, C, D] while the experts run: experts over expert, rows over the rest (the
        # switch from rows over every batch axis is the all-to-all)
        "act_expert": "expert",
        "act_expert_batch": tuple(a for a in BATCH_AXES if a != "expert"),
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


def per_shard(
    fn: Callable[..., jax.Array], in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None]
) -> Callable[..., jax.Array]:
    """``fn`` run on each device's shard of its inputs, laid out by logical names (``jax.shard_map`` over the active
    mesh); without an active mesh, ``fn`` itself. The output has the first input's shape (attention's).

    The partitioning rule for kernels the SPMD partitioner cannot split (Pallas and cuDNN custom calls): it would run
    them on whole, gathered inputs on every device. Dims named None are whole in every shard (attention's length).
    Inside the pipeline's ``vmap(spmd_axis_name="pipeline")`` the stage dim is added by shard_map's batching rule.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn
    mesh, table = active

    def run(*args: jax.Array) -> jax.Array:
        specs = tuple(_fit(spec(n, table), a.shape, mesh) for n, a in zip(in_names, args, strict=True))
        out = _fit(spec(out_names, table), args[0].shape, mesh)
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(*args)

    return run


def _fit(pspec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (e.g. 4 KV heads on tensor 8 stay replicated), and an axis
    named twice stays on the later dimension: msp/fsp logits are ``(length -> tensor, vocab -> tensor)`` by name, and
    the vocab split wins, as in Megatron's sequence parallelism (the length is gathered before the head)."""
    entries = tuple(pspec) + (None,) * (len(shape) - len(pspec))
    out: list[Any] = []
    taken: set[str] = set()
    for dim, axes in reversed(list(zip(shape, entries, strict=True))):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a not in taken)
        size = math.prod(mesh.shape[a] for a in names)
        keep = names and dim % size == 0
        taken.update(names if keep else ())
        out.append((names[0] if len(names) == 1 else names) if keep else None)
    return PartitionSpec(*reversed(out))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, table: Rules) -> dict:
    """NamedShardings for a model's params, as a pure dict matching ``nnx.to_pure_dict(state)``."""

    def one(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("axes")
        if names is None:
            raise ValueError(f"parameter of shape {var.get_value().shape} has no logical axis names")
        return NamedSharding(mesh, _fit(spec(names, table), var.get_value().shape, mesh))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def zero1_sharding(param: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """Optimizer-state sharding for ZeRO-1: the param's own spec plus the ``fsdp`` (ZeRO group) axis on a free,
    divisible dim; a param already sharded over the group (FSDP) keeps its spec."""
    mesh = param.mesh
    entries = list(tuple(param.spec) + (None,) * (len(shape) - len(param.spec)))
    used_anywhere = {a for axes in entries for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))}
    if mesh.shape["fsdp"] == 1 or "fsdp" in used_anywhere:
        return param
    for i, (dim, axes) in enumerate(zip(shape, entries, strict=True)):
        used = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in used) * mesh.shape["fsdp"]
        if dim % size == 0:
            entries[i] = tuple(used) + ("fsdp",) if used else "fsdp"
            return NamedSharding(mesh, PartitionSpec(*entries))
    return param  # too small to split: replicated, as InternEvo keeps whole params on one ZeRO rank


def data_parallel_size(mesh: Mesh) -> int:
    """How many batch rows a step splits over: the product of the ``BATCH_AXES``."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def data_parallel_rows(mesh: Mesh) -> tuple[int, range]:
    """The data-parallel size of ``mesh`` (``data x fsdp x weight``) and the rows this process feeds (processes own
    contiguous, equal blocks of the data axes)."""
    dp = data_parallel_size(mesh)
    n, i = jax.process_count(), jax.process_index()
    if dp % n:
        raise ConfigError(f"data-parallel size {dp} is not divisible by the process count {n}")
    per = dp // n
    return dp, range(i * per, (i + 1) * per)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a global batch array ``[micro_num, rows, packed_length]``: rows over the data axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
