"""Launcher detection and ``jax.distributed.initialize`` from SLURM, torchrun variables, or one local process.

Even a single local process starts the JAX distributed client: JAX's preemption sync point (SIGTERM -> a clean
checkpoint at an agreed step) exists only with it (``shared/reference/reliability.md`` E5-E7). No Python SIGTERM
handler is installed anywhere, since one would disable that mechanism (E7).

Devices per process: on GPUs, SLURM/torchrun start one process per GPU when a node runs several tasks, so each
process drives the GPU of its local rank. On CPUs (tests, ``JAX_PLATFORMS=cpu``) a process uses all its local
devices (``--xla_force_host_platform_device_count``), and several processes reduce across each other with gloo.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import jax
import portpicker

LAUNCHERS = ("local", "slurm", "torch")
DEFAULT_PORT = 8888  # InternEvo's --port default


@dataclass(frozen=True)
class ClusterSpec:
    """Where this process sits in the JAX cluster."""

    launcher: str
    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None  # one process per GPU: the GPU it drives; None: all devices


def detect_launcher(env: Mapping[str, str] | None = None) -> str:
    """slurm if SLURM task variables are set, torch if torchrun's are, else local."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" in env and ("SLURM_NPROCS" in env or "SLURM_NTASKS" in env):
        return "slurm"
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return "torch"
    return "local"


def _slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("launcher slurm: SLURM_JOB_NODELIST is not set; run under srun or pass --launcher local")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]  # a plain single host name; bracketed ranges need scontrol


def _cpu_only(env: Mapping[str, str] | None) -> bool:
    """True when JAX will run on CPU devices only (``JAX_PLATFORMS=cpu``), as jax reads it at import."""
    if env is not None:
        platforms = env.get("JAX_PLATFORMS", "")
    else:  # jax 0.10's Config declares no flag attributes to a type checker (0.11's does): an ignore for 0.10 only
        platforms = jax.config.jax_platforms or ""  # type: ignore[attr-defined, unused-ignore]
    names = {p.strip() for p in platforms.split(",") if p.strip()}
    return names == {"cpu"}


def cluster_spec(launcher: str, port: int | None, env: Mapping[str, str] | None = None) -> ClusterSpec:
    """Reads the cluster layout for a launcher from the environment (L-03, L-04).

    ``env`` defaults to ``os.environ`` (and the platform to jax's ``jax_platforms``); tests pass their own.
    """
    one_device_per_process = not _cpu_only(env)
    env = dict(os.environ if env is None else env)
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")
    if launcher == "slurm":
        world = int(env.get("SLURM_NPROCS") or env.get("SLURM_NTASKS") or 0)
        if "SLURM_PROCID" not in env or world <= 0:
            raise RuntimeError("launcher slurm: SLURM_PROCID / SLURM_NPROCS are not set; run under srun")
        per_node = int("".join(c for c in env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] if c.isdigit()) or 1)
        several = one_device_per_process and per_node > 1
        local = (int(env["SLURM_LOCALID"]),) if several and "SLURM_LOCALID" in env else None
        return ClusterSpec(
            "slurm", f"{_slurm_host(env)}:{port or DEFAULT_PORT}", world, int(env["SLURM_PROCID"]), local
        )
    if launcher == "torch":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"launcher torch: environment variables {missing} are not set; start with torchrun")
        # torchrun's MASTER_PORT wins over --port, as in InternEvo.
        per_node = int(env.get("LOCAL_WORLD_SIZE", "1"))
        several = one_device_per_process and per_node > 1
        local = (int(env["LOCAL_RANK"]),) if several and "LOCAL_RANK" in env else None
        coordinator = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        return ClusterSpec("torch", coordinator, int(env["WORLD_SIZE"]), int(env["RANK"]), local)
    return ClusterSpec("local", f"127.0.0.1:{port or portpicker.pick_unused_port()}", 1, 0)


def initialize(spec: ClusterSpec) -> None:
    """Starts the JAX cluster (call before anything touches a device).

    CPU collectives (they only concern the CPU backend, so this is safe on GPU hosts too): with several processes,
    cross-process all-reduces go through gloo over TCP; one process keeps XLA's in-process collectives, which a
    distributed client would otherwise also route through gloo (steps several times slower on 8 fake CPU devices).
    A user's explicit choice (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``) is kept.
    """
    impl = jax.config.jax_cpu_collectives_implementation  # type: ignore[attr-defined, unused-ignore]  # (as _cpu_only)
    if spec.num_processes > 1 and impl is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    elif spec.num_processes == 1 and impl == "gloo":
        jax.config.update("jax_cpu_collectives_implementation", None)
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
        # The spec is the whole truth: no SLURM/OMPI auto-detection that would pin a local process inside an
        # allocation (salloc, then --launcher local) to the GPU of SLURM_LOCALID.
        cluster_detection_method="deactivate",
    )


def gpu_xla_flags(hybrid_zero_optimizer: Any) -> list[str]:
    """XLA flags for GPU runs, from InternEvo's ``hybrid_zero_optimizer`` knobs
    (docs/internevo_parity.md#overlap-and-bucket-knobs).

    The latency-hiding scheduler lets collectives overlap compute; ``reduce_bucket_size`` and ``all_gather_size``
    become XLA's combine thresholds (XLA buckets collectives itself, the knobs keep their meaning: bytes per
    combined collective); ``overlap_sync_grad`` / ``overlap_sync_param`` turn on XLA's pipelined reduce-scatter and
    all-reduce / all-gather, which move them across layer-loop iterations so they run under the next layer's
    compute. Every flag here exists in jax 0.10.2 and 0.11.2 (XLA rejects unknown flags at start-up).
    """
    hzo = hybrid_zero_optimizer
    reduce_bytes, gather_bytes = int(hzo.reduce_bucket_size), int(hzo.all_gather_size)
    flags = [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        f"--xla_gpu_all_reduce_combine_threshold_bytes={reduce_bytes}",
        f"--xla_gpu_reduce_scatter_combine_threshold_bytes={reduce_bytes}",
        f"--xla_gpu_all_gather_combine_threshold_bytes={gather_bytes}",
    ]
    if hzo.overlap_sync_grad:
        flags += ["--xla_gpu_enable_pipelined_reduce_scatter=true", "--xla_gpu_enable_pipelined_all_reduce=true"]
    if hzo.overlap_sync_param:
        flags += ["--xla_gpu_enable_pipelined_all_gather=true"]
    return flags


def set_gpu_xla_flags(hybrid_zero_optimizer: Any, env: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds ``gpu_xla_flags`` to ``XLA_FLAGS`` before the GPU backend starts; flags the user already set win.

    Does nothing on CPU-only runs (``JAX_PLATFORMS=cpu``) or when no CUDA plugin is installed. Returns the flags
    added, for the log.
    """
    env = os.environ if env is None else env
    if _cpu_only(env) or not any(importlib.util.find_spec(m) for m in _CUDA_PLUGINS):
        return []
    current = env.get("XLA_FLAGS", "")
    have = {f.split("=", 1)[0] for f in current.split()}
    added = [f for f in gpu_xla_flags(hybrid_zero_optimizer) if f.split("=", 1)[0] not in have]
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")
