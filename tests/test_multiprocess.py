"""Multi-process training: 2 processes x 4 CPU devices, started as torchrun starts them, form one 8-device cluster
whose loss curve equals a single process on 8 devices; only process 0 writes run files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import portpicker

from internevo_jax.distributed import cluster_spec

from .conftest import ROOT

STEPS = 4
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID")


def test_cpu_processes_keep_all_their_devices():
    torch = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert cluster_spec("torch", None, {**torch, "JAX_PLATFORMS": "cpu"}).local_device_ids is None
    assert cluster_spec("torch", None, {**torch, "JAX_PLATFORMS": "cuda"}).local_device_ids == (1,)
    slurm = dict(SLURM_PROCID="1", SLURM_NPROCS="2", SLURM_JOB_NODELIST="h", SLURM_LOCALID="1")
    slurm["SLURM_NTASKS_PER_NODE"] = "2"
    assert cluster_spec("slurm", None, {**slurm, "JAX_PLATFORMS": "cpu"}).local_device_ids is None
    assert cluster_spec("slurm", None, slurm).local_device_ids == (1,)


def _start(tmp_path: Path, name: str, devices: int, launcher: str, **extra_env: str) -> tuple[subprocess.Popen, Path]:
    """Starts ``launch.py`` with its run folder at ``tmp_path / name`` and its output in ``tmp_path / name.log``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra_env)
    log = tmp_path / f"{name}.log"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        f"--config.data.total_steps={STEPS}",
        f"--config.run_folder={tmp_path / name}",
        f"--launcher={launcher}",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _finish(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0] * len(procs):
        logs = "\n".join(f"===== {log.name} (exit {p.returncode})\n{log.read_text()[-6000:]}" for p, log in procs)
        raise AssertionError(f"exit codes {codes}\n{logs}")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path: Path):
    port = portpicker.pick_unused_port()
    torch = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
    # Each rank gets its own run folder only so the test can see that rank 1 writes nothing; a real job shares one.
    # All three processes run at once: compiling dominates and overlaps on two cores.
    procs = [_start(tmp_path, f"rank{r}", 4, "torch", RANK=str(r), LOCAL_RANK=str(r), **torch) for r in (0, 1)]
    procs.append(_start(tmp_path, "single", 8, "local"))
    _finish(procs)

    for rank, (_, log) in enumerate(procs[:2]):
        text = log.read_text()
        assert f"launcher torch: process {rank} of 2" in text
        assert "on 8 cpu device(s)" in text  # one cluster: each process's mesh spans all 8 devices
    assert not (tmp_path / "rank1").exists()  # rank 1: no config.json, metrics or TensorBoard files
    multi, single = _metrics(tmp_path / "rank0"), _metrics(tmp_path / "single")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(STEPS))
    for m, s in zip(multi, single, strict=True):
        assert m["num_consumed_tokens"] == s["num_consumed_tokens"]
        for key in ("loss", "grad_norm"):
            assert abs(m[key] - s[key]) <= 1e-5 * abs(s[key]), (m["step"], key, m[key], s[key])
