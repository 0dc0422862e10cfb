"""Command-line entry points: ``internevo-train`` (also ``python -m internevo_jax`` and a checkout's
``python launch.py``), ``internevo-convert``, ``internevo-generate`` and ``internevo-serve``.

Train: ``internevo-train --config=configs/demo.py [--config.data.total_steps=5 ...]``; ``--config=demo`` (a name, no
such file here) is the config shipped with the package. ``--print_config`` prints the resolved config (JSON, secrets
masked, as the run's ``config.json``) and exits 0.

Run it on every host (srun, torchrun or by hand); each process joins one JAX cluster. Exit codes, so a restart
policy can tell failures apart: 0 done, preempted by SIGTERM (checkpoint written) or stopped by the stop file,
2 config error, 3 no usable checkpoint (or one that cannot be written), 4 hang (the watchdog fired), 5 data error,
6 numerics (non-finite gradients step after step), 7 run folder not writable (disk full, read-only), 130 Ctrl-C
(saved at an agreed step, or a second Ctrl-C: stopped at once), 143 SIGTERM with checkpointing off (stopped cleanly,
nothing saved). Restart on 4 and after 0 with a preemption; 2, 5, 6 and 7 need a person. ``errors.EXIT_CODES`` maps
the error classes to these codes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from internevo_jax import __version__
from internevo_jax import config as config_lib
from internevo_jax import train as train_lib
from internevo_jax.errors import EXIT_INTERRUPTED, ConfigError, exit_code_of
from internevo_jax.initialize import get_default_parser, initialize_distributed_env, load_config, parse_args
from internevo_jax.interrupts import exit_code
from internevo_jax.monitoring.logger import get_logger


def train(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Trains as InternEvo's ``train.py`` does; returns the exit code (the module docstring lists them)."""
    parser = get_default_parser()
    if prog is not None:
        parser.prog = prog
    parser.add_argument("--version", action="version", version=f"internevo_jax {__version__}")
    args = parse_args(parser, argv)
    try:
        if args.print_config:  # before the cluster, the mesh or any compile: a config check that costs nothing
            print(config_lib.to_json(load_config(args.config, args.seed, args.overrides)))
            return 0
        config = initialize_distributed_env(args.config, args.launcher, args.port, args.seed, args.overrides)
        summary = train_lib.run(config, profiling=args.profiling)
    except KeyboardInterrupt:  # before the loop's handler was installed, or a second Ctrl-C (fit said where)
        print(f"interrupted (Ctrl-C): exit code {EXIT_INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        known = exit_code_of(e)
        if known is None:  # a bug: the traceback and exit code 1
            raise
        code, label = known
        if isinstance(e, ConfigError):  # before the logger is set up, and no run to log it beside
            print(f"{label}: {e}", file=sys.stderr)
        else:
            get_logger().error("%s: %s", label, e)
        return code
    return exit_code(summary)


def _tool_main(module: str) -> Callable[[list[str] | None], int]:
    """``main`` of a ``tools/`` script shipped as ``internevo_jax.tools.<module>``."""
    return importlib.import_module(f"internevo_jax.tools.{module}").main


def convert(argv: list[str] | None = None) -> int:
    """``internevo-convert``: ``tools/convert_checkpoint.py`` (weights between our checkpoints, HF and InternEvo)."""
    return _tool_main("convert_checkpoint")(argv)


def generate(argv: list[str] | None = None) -> int:
    """``internevo-generate``: ``tools/generate.py`` (text from a checkpoint with the ``generation`` settings)."""
    return _tool_main("generate")(argv)


def serve(argv: list[str] | None = None) -> int:
    """``internevo-serve``: ``tools/serve.py`` (an OpenAI-compatible server and chat page on a checkpoint)."""
    return _tool_main("serve")(argv)
