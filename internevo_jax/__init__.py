"""internevo_jax: InternEvo's training framework on JAX/XLA.

The public API mirrors InternEvo's train.py flow:

    args = parse_args()
    config = initialize_distributed_env(args.config, args.launcher, args.port, args.seed, args.overrides)
    Trainer(config).fit()
"""

from internevo_jax.config import ConfigError, default_config, load
from internevo_jax.initialize import get_default_parser, initialize_distributed_env, parse_args
from internevo_jax.model import MODELS, build_model, register_model
from internevo_jax.step import TrainState
from internevo_jax.train import Trainer

__all__ = [
    "MODELS",
    "ConfigError",
    "TrainState",
    "Trainer",
    "build_model",
    "default_config",
    "get_default_parser",
    "initialize_distributed_env",
    "load",
    "parse_args",
    "register_model",
]
