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
