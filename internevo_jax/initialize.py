"""InternEvo's entry points, JAX-native: the seams of ``train.py`` made public.

``get_default_parser`` / ``parse_args`` -> ``initialize_distributed_env`` (config, cluster, seeds) ->
``initialize_model`` (abstract: shapes and logical axes, no memory) -> ``build_train_loader_with_data_type`` /
``build_valid_loader_with_data_type`` (this process's slice of the data) -> ``TrainerBuilder(...).fit()``.
"""

from __future__ import annotations

import argparse
import logging
import random
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from internevo_jax import config as config_lib
from internevo_jax import distributed, train
from internevo_jax import mesh as mesh_lib
from internevo_jax.data import validation
from internevo_jax.model import build_model
from internevo_jax.monitoring.logger import get_logger


def get_default_parser() -> argparse.ArgumentParser:
    """InternEvo's default parser (L-01); add your own arguments with ``parser.add_argument``.

    ``--config.a.b=value`` overrides are collected by ``parse_args`` into ``args.overrides``.
    """
    parser = argparse.ArgumentParser(
        description="internevo_jax training", epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument(
        "--config",
        type=str,
        required=True,
        help="a config .py file (InternEvo or get_config() style), or the name of a shipped one (demo, tiny, "
        "internlm2_7b, ...; an unknown name lists them)",
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
    parser.add_argument("--profiling", action="store_true", help="record a jax.profiler trace (monitor.profile_*)")
    parser.add_argument(
        "--print_config",
        action="store_true",
        help="print the resolved config as JSON (as config.json holds it, secrets masked) and exit; nothing starts",
    )
    return parser


def parse_args(parser: argparse.ArgumentParser | None = None, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; ``--config.x.y=v`` arguments land in ``args.overrides`` (validated on load).

    As ml_collections' config flags: ``--config.x.y v`` (the value after a space) is ``--config.x.y=v``, and a bare
    ``--config.x.y`` / ``--noconfig.x.y`` sets a bool key to True / False.
    """
    parser = parser or get_default_parser()
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        i += 1
        if arg.startswith("--noconfig.") and "=" not in arg:
            overrides.append(arg)
        elif arg.startswith("--config."):
            # The next word is this flag's value unless it is another flag (absl's rule; "-1" is a value).
            if "=" not in arg and i < len(rest) and not rest[i].startswith("--"):
                arg, i = f"{arg}={rest[i]}", i + 1
            overrides.append(arg)
        else:
            unknown.append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    return args


def load_config(
    config: str, seed: int | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """The resolved, validated config of a command line: the file, its ``--config.`` overrides and ``--seed``."""
    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"--config.seed={seed}")
    get_logger()  # the package logger's handler, before the config writes its warnings to it
    return config_lib.load(config, overrides)


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
    cfg = load_config(config, seed, overrides)
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


def initialize_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model ``config.model_type`` names, abstract: its graph, shapes and logical axis names, no memory.

    InternEvo's ``initialize_model`` allocates the weights on every GPU; here the ``Trainer`` creates them already
    sharded over the mesh (or restores them), so a model larger than one device never exists whole. Pass a
    concrete module to ``TrainerBuilder`` instead to start from its weights.
    """
    return nnx.eval_shape(lambda: build_model(config.model_type, config.model, nnx.Rngs(config.seed)))


def build_train_loader_with_data_type(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> tuple[Any, list[str]]:
    """This process's training data and the dataset type names (InternEvo's ``train_dl, dataset_types``).

    The loader is random access by batch number (``loader[k]`` is batch k: ``tokens``, ``labels``, ``positions``,
    ``segment_ids``, ``type_ids``, each ``[micro_num, rows, packed_length]``), so resuming is exact; for
    ``data.type`` hf/streaming it is a stream. ``mesh`` defaults to the one ``config.parallel`` gives.
    """
    return train.train_loader(config, mesh or mesh_lib.make_mesh(config.parallel))


def build_valid_loader_with_data_type(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> dict[str, validation.ValidSet]:
    """The validation sets of ``data.valid_folder`` by name (InternEvo's ``val_dls``); a set too small for the
    data-parallel size is left out with a warning naming it and why."""
    return train.valid_loaders(config, mesh or mesh_lib.make_mesh(config.parallel))
