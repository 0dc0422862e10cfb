"""Train with internevo_jax: ``python launch.py --config=configs/demo.py [--config.data.total_steps=5 ...]``.

Run it on every host (srun, torchrun or by hand); each process joins one JAX cluster. Exit codes: 0 done or
preempted (checkpoint written), 2 config error, 3 training diverged (non-finite gradients step after step).
"""

from __future__ import annotations

import sys

from internevo_jax import ConfigError, Trainer, initialize_distributed_env, parse_args
from internevo_jax.metrics import get_logger
from internevo_jax.train import TrainingDiverged


def main() -> int:
    args = parse_args()
    try:
        config = initialize_distributed_env(args.config, args.launcher, args.port, args.seed, args.overrides)
        Trainer(config, profiling=args.profiling).fit()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        get_logger().error("training diverged: %s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
