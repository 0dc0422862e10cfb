"""Launcher detection and cluster specs from SLURM / torchrun environments."""

import pytest

from internevo_jax.distributed import cluster_spec, detect_launcher


def test_detect():
    assert detect_launcher({}) == "local"
    assert detect_launcher({"SLURM_PROCID": "3", "SLURM_NPROCS": "16"}) == "slurm"
    assert detect_launcher({"RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "h"}) == "torch"


def test_torchrun_env():
    env = dict(
        RANK="5", WORLD_SIZE="16", MASTER_ADDR="node0", MASTER_PORT="29500", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8"
    )
    spec = cluster_spec("torch", port=1234, env=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("node0:29500", 16, 5)
    assert spec.local_device_ids == (5,)  # one process per GPU


def test_slurm_env():
    env = dict(
        SLURM_PROCID="9",
        SLURM_NPROCS="16",
        SLURM_JOB_NODELIST="gpu-a",
        SLURM_LOCALID="1",
        SLURM_NTASKS_PER_NODE="8(x2)",
    )
    spec = cluster_spec("slurm", port=None, env=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.local_device_ids) == ("gpu-a:8888", 16, 9, (1,))


def test_missing_env_is_clear():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        cluster_spec("torch", port=None, env=dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(ValueError, match="valid: local, slurm, torch"):
        cluster_spec("mpi", port=None, env={})


def test_local():
    spec = cluster_spec("local", port=None, env={})
    assert spec.num_processes == 1 and spec.coordinator.startswith("127.0.0.1:")


def test_gpu_xla_flags_follow_the_hybrid_zero_optimizer_keys(monkeypatch):
    import importlib.util

    from internevo_jax import config as config_lib
    from internevo_jax import distributed

    hzo = config_lib.default_config().hybrid_zero_optimizer
    flags = distributed.gpu_xla_flags(hzo)
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=536870912" in flags  # reduce_bucket_size
    assert not any("pipelined" in f for f in flags)  # overlap_sync_* default off
    hzo.unlock()
    hzo.overlap_sync_grad, hzo.overlap_sync_param, hzo.all_gather_size = True, True, 1024
    flags = distributed.gpu_xla_flags(hzo)
    assert "--xla_gpu_all_gather_combine_threshold_bytes=1024" in flags
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    # CPU runs and machines without the CUDA plugin get nothing; a flag the user set wins.
    assert distributed.set_gpu_xla_flags(hzo, {"JAX_PLATFORMS": "cpu"}) == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name == "jax_cuda13_plugin" or None)
    env = {"XLA_FLAGS": "--xla_gpu_all_gather_combine_threshold_bytes=7"}
    added = distributed.set_gpu_xla_flags(hzo, env)
    assert added and all("all_gather_combine" not in f for f in added)
    assert env["XLA_FLAGS"].startswith("--xla_gpu_all_gather_combine_threshold_bytes=7 --xla_gpu_enable_latency")


def test_gpu_xla_flags_exist_in_this_xla():
    """XLA parses every flag at start-up on any backend and aborts on unknown ones, so a CPU start proves the names."""
    import os
    import subprocess
    import sys

    from internevo_jax import config as config_lib
    from internevo_jax import distributed

    hzo = config_lib.default_config().hybrid_zero_optimizer
    hzo.unlock()
    hzo.overlap_sync_grad = hzo.overlap_sync_param = True

    def start(flags):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
        return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)

    assert start(distributed.gpu_xla_flags(hzo)).returncode == 0
    assert start(["--xla_gpu_no_such_flag_zz=1"]).returncode != 0  # the check can fail
