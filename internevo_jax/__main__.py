"""``python -m internevo_jax --config=...``: the training entry point, as ``internevo-train`` and ``launch.py``."""

import sys

from internevo_jax.cli import train

if __name__ == "__main__":
    sys.exit(train(prog="python -m internevo_jax"))
