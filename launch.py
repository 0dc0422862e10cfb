"""Train with internevo_jax from a checkout: ``python launch.py --config=configs/demo.py [--config.data.total_steps=5
...]``, the same as the installed ``internevo-train`` and ``python -m internevo_jax``.

``--print_config`` prints the resolved config (JSON, secrets masked, as the run's ``config.json``) and exits 0.
Exit codes (0 done or preempted with a checkpoint, 2 config, 3 checkpoint, 4 hang, 5 data, 6 numerics, 130 Ctrl-C,
143 SIGTERM without checkpointing): ``internevo_jax/cli.py`` says which to restart on.
"""

from __future__ import annotations

import sys

from internevo_jax.cli import train as main

if __name__ == "__main__":
    sys.exit(main())
