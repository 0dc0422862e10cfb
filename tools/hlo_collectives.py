"""Counts the collectives in the compiled train step of each parallel layout (a check that no layout runs a
collective it does not need).

    python tools/hlo_collectives.py [--devices 8]

Runs the tiny config (4 layers, fp32) on fake CPU devices, compiles one step per layout from tests/test_parallel.py
and prints a markdown table of the collective ops in the optimized HLO. The layers run under ``lax.scan``, so ops
inside the loop body appear once but run once per layer.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import jax

    from internevo_jax import config as config_lib
    from tests.test_parallel import BASE, LAYOUTS, Layout

    print("| layout | " + " | ".join(OPS) + " |")
    print("|---|" + "---|" * len(OPS))
    for name, overrides in {"1 device": (), **LAYOUTS}.items():
        cfg = config_lib.load(root / "configs" / "tiny.py", [f"--config.{o}" for o in (*BASE, *overrides)])
        devices = jax.devices()[:1] if name == "1 device" else jax.devices()
        hlo = Layout(cfg, devices).compiled.as_text()
        counts = [len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in OPS]  # the opcode, not %names
        print(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")


if __name__ == "__main__":
    main()
