"""Launcher detection and ``jax.distributed.initialize`` from SLURM, torchrun variables, or one local process.

Even a single local process starts the JAX distributed client: JAX's preemption sync point (SIGTERM -> a clean
checkpoint at an agreed step) exists only with it (``shared/reference/reliability.md`` E5-E7). No Python SIGTERM
handler is installed anywhere, since one would disable that mechanism (E7).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

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
    local_device_ids: tuple[int, ...] | None = None  # one process per GPU: the GPU this process drives


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """slurm if SLURM task variables are set, torch if torchrun's are, else local."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" in env and ("SLURM_NPROCS" in env or "SLURM_NTASKS" in env):
        return "slurm"
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return "torch"
    return "local"


def _slurm_host(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("launcher slurm: SLURM_JOB_NODELIST is not set; run under srun or pass --launcher local")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]  # a plain single host name; bracketed ranges need scontrol


def cluster_spec(launcher: str, port: int | None, env: dict[str, str] | None = None) -> ClusterSpec:
    """Reads the cluster layout for a launcher from the environment (L-03, L-04)."""
    env = dict(os.environ if env is None else env)
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")
    if launcher == "slurm":
        world = int(env.get("SLURM_NPROCS") or env.get("SLURM_NTASKS") or 0)
        if "SLURM_PROCID" not in env or world <= 0:
            raise RuntimeError("launcher slurm: SLURM_PROCID / SLURM_NPROCS are not set; run under srun")
        per_node = int("".join(c for c in env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] if c.isdigit()) or 1)
        local = (int(env["SLURM_LOCALID"]),) if per_node > 1 and "SLURM_LOCALID" in env else None
        return ClusterSpec(
            "slurm", f"{_slurm_host(env)}:{port or DEFAULT_PORT}", world, int(env["SLURM_PROCID"]), local
        )
    if launcher == "torch":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"launcher torch: environment variables {missing} are not set; start with torchrun")
        # torchrun's MASTER_PORT wins over --port, as in InternEvo.
        per_node = int(env.get("LOCAL_WORLD_SIZE", "1"))
        local = (int(env["LOCAL_RANK"]),) if per_node > 1 and "LOCAL_RANK" in env else None
        coordinator = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        return ClusterSpec("torch", coordinator, int(env["WORLD_SIZE"]), int(env["RANK"]), local)
    return ClusterSpec("local", f"127.0.0.1:{port or portpicker.pick_unused_port()}", 1, 0)


def initialize(spec: ClusterSpec) -> None:
    """Starts the JAX cluster (call before anything touches a device)."""
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
    )
