"""internevo_jax: InternEvo's training framework on JAX/XLA.

The public API mirrors InternEvo's train.py flow:

    args = parse_args()
    config = initialize_distributed_env(args.config, args.launcher, args.port, args.seed, args.overrides)
    model = initialize_model(config)
    train_dl, dataset_types = build_train_loader_with_data_type(config)
    val_dls = build_valid_loader_with_data_type(config)
    TrainerBuilder(model, train_dl, val_dls, config=config, dataset_types=dataset_types).fit()
"""

from importlib import metadata as _metadata
from pathlib import Path as _Path

from internevo_jax.config import ConfigError, default_config, load
from internevo_jax.initialize import (
    TrainerBuilder,
    build_train_loader_with_data_type,
    build_valid_loader_with_data_type,
    get_default_parser,
    initialize_distributed_env,
    initialize_model,
    parse_args,
)
from internevo_jax.mesh import make_mesh
from internevo_jax.model import MODELS, build_model, register_model
from internevo_jax.step import TrainState
from internevo_jax.train import Trainer


def _version() -> str:
    """The installed distribution's version; a plain checkout (never installed) reads its pyproject.toml."""
    try:
        return _metadata.version("internevo_jax")
    except _metadata.PackageNotFoundError:
        import tomllib

        pyproject = _Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()

__all__ = [
    "MODELS",
    "ConfigError",
    "TrainState",
    "Trainer",
    "TrainerBuilder",
    "build_model",
    "build_train_loader_with_data_type",
    "build_valid_loader_with_data_type",
    "default_config",
    "get_default_parser",
    "initialize_distributed_env",
    "initialize_model",
    "load",
    "make_mesh",
    "parse_args",
    "register_model",
]
