"""InternEvo's entry points, JAX-native: ``get_default_parser``, ``parse_args``, ``initialize_distributed_env``."""

from __future__ import annotations

import argparse
import logging
import random

import ml_collections
import numpy as np

from internevo_jax import config as config_lib
from internevo_jax import distributed
from internevo_jax.metrics import get_logger


def get_default_parser() -> argparse.ArgumentParser:
    """InternEvo's default parser (L-01); add your own arguments with ``parser.add_argument``.

    ``--config.a.b=value`` overrides are collected by ``parse_args`` into ``args.overrides``.
    """
    parser = argparse.ArgumentParser(
        description="internevo_jax training", epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument(
        "--config", type=str, required=True, help="path to a config .py file (InternEvo or get_config() style)"
    )
    parser.add_argument(
        "--launcher",
        type=str,
        default=None,
        choices=distributed.LAUNCHERS,
        help="how processes were started (default: detected from the environment)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="coordinator port (default 8888 for slurm, a free port for local; torchrun's MASTER_PORT wins)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed, 1024)")
    parser.add_argument("--profiling", action="store_true", help="record a jax.profiler trace (issue #5)")
    return parser


def parse_args(parser: argparse.ArgumentParser | None = None, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; ``--config.x.y=v`` arguments land in ``args.overrides`` (validated on load)."""
    parser = parser or get_default_parser()
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for arg in rest:
        (overrides if arg.startswith("--config.") else unknown).append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    return args


def initialize_distributed_env(
    config: str,
    launcher: str | None = None,
    master_port: int | None = None,
    seed: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    start_cluster: bool = True,
) -> ml_collections.ConfigDict:
    """Loads and validates the config, starts the JAX cluster and seeds host RNGs; returns the resolved config.

    ``start_cluster=False`` skips ``jax.distributed.initialize`` (tests that run several trainers in one process).
    """
    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"--config.seed={seed}")
    cfg = config_lib.load(config, overrides)
    log = get_logger()
    launcher = launcher or distributed.detect_launcher()
    added = distributed.set_gpu_xla_flags(cfg.hybrid_zero_optimizer)  # before anything starts the GPU backend
    if added:
        log.info("XLA flags for GPU: %s", " ".join(added))
    if start_cluster:
        spec = distributed.cluster_spec(launcher, master_port)
        distributed.initialize(spec)
        log.info(
            "launcher %s: process %d of %d, coordinator %s",
            spec.launcher,
            spec.process_id,
            spec.num_processes,
            spec.coordinator,
        )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    logging.getLogger("absl").setLevel(logging.WARNING)
    return cfg
