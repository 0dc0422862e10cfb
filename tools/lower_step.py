"""Lower a config's train step for CUDA on a host without a GPU, and list the kernels it calls.

    python tools/lower_step.py --config=configs/internlm2_1_8b.py --config.model.attn_impl=pallas [--devices 8]
        [--config.parallel.tensor.size=2 ...] [--json OUT.json]

JAX lowers for a platform that is not present (``.trace(...).lower(lowering_platforms=("cuda",))``): the whole
GPU path of the step -- the Pallas kernels' Triton calls, the cuDNN fused-attention custom calls, their sharding
under the config's mesh -- is built exactly as on a GPU, only not compiled by XLA's GPU backend. So an API change
in jax that breaks the GPU path fails here, on any CPU, instead of in the first minutes of a lent GPU
(``tests/test_gpu_lowering.py`` runs this for ``pallas`` and ``cudnn`` on 1 and 8 fake devices).

``--devices N`` gives JAX N fake CPU devices for the mesh. The data is abstract (shapes only); nothing is allocated
or compiled, so even a 7B config lowers in seconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

# The custom calls that carry the GPU kernels in lowered StableHLO: Pallas-Triton, cuDNN fused attention, others.
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.]+)")


@contextlib.contextmanager
def assume_hopper(cudnn_version: int = 91000) -> Iterator[None]:
    """Answer jax's GPU-target questions as a Hopper GPU (sm_90) with cuDNN ``cudnn_version``, on a host with none.

    Two places in jax ask the local device while tracing or lowering: the cuDNN attention wrapper
    (``jax._src.cudnn.fused_attention_stablehlo``: compute capability and cuDNN version, to refuse unsupported head
    dims and the packed layout before Hopper) and, from jax 0.11, Pallas' Triton lowering (``gpu_info``: the
    compute capability it compiles for). A CPU-only jaxlib has no answer ("cuDNN is not detected", "No supported GPU
    devices found"), so the target is stated here. Every other check (shapes, layouts, dtypes, block specs) runs as
    on the device. (jax's own way to name an AOT target, an abstract mesh on an ``AbstractDevice``, conflicts with
    the concrete mesh our ``shard_map`` runs the kernels on.)
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(cudnn, "check_cudnn_version", lambda: cudnn_version))
        stack.enter_context(mock.patch.object(cudnn, "check_compute_capability", lambda c: (9, 0) >= _version(c)))
        stack.enter_context(
            mock.patch.object(cudnn, "is_cuda_compute_capability_equal", lambda c: _version(c) == (9, 0))
        )
        try:
            from jax._src.pallas.triton import gpu_info
        except ImportError:  # jax < 0.11 lowers Triton kernels without asking for the device
            gpu_info = None
        if gpu_info is not None:
            hopper = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
            stack.enter_context(mock.patch.object(gpu_info, "get_gpu_info", lambda: hopper))
        yield


def _version(capability: str) -> tuple[int, ...]:
    return tuple(int(x) for x in capability.split("."))


def lower_train_step(config: Any, devices: list | None = None, platform: str = "cuda") -> Any:
    """The config's jitted train step (as ``Trainer`` builds it), lowered for ``platform``: a ``jax.stages.Lowered``.

    Mesh from ``config.parallel`` over ``devices`` (default: all); state and batch are abstract, with the shardings
    training uses. Attention is resolved for a GPU (``attention.target_platform``).
    """
    import jax
    import jax.numpy as jnp

    from internevo_jax import mesh as mesh_lib
    from internevo_jax.checkpoint.arrays import abstract_with_shardings
    from internevo_jax.checkpoint.start import StateFactory, model_parts
    from internevo_jax.data import loader
    from internevo_jax.mesh import data_parallel_rows
    from internevo_jax.ops import attention
    from internevo_jax.optim import make_optimizer
    from internevo_jax.step import make_train_step

    mesh = mesh_lib.make_mesh(config.parallel, devices)
    rules = mesh_lib.rules(config.parallel)
    graphdef, abstract_params, _ = model_parts(config, None)
    tx = make_optimizer(config.adam, config.lr_scheduler, config.beta2_scheduler)
    states = StateFactory(config, mesh, rules, abstract_params, None, tx)
    dp, _ = data_parallel_rows(mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    shape = (config.data.micro_num, dp, config.data.packed_length)
    batch = {f: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for f in loader.FIELDS}
    step = jax.jit(
        make_train_step(config, graphdef, tx, len(loader.DATASET_TYPES)),
        in_shardings=(states.shardings, batch_sharding),
        out_shardings=(states.shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    gpu = "gpu" if platform in ("cuda", "rocm") else platform
    with mesh_lib.activate(mesh, rules), attention.target_platform(gpu):
        traced = step.trace(abstract_with_shardings(states.abstract_state, states.shardings), batch)
        return traced.lower(lowering_platforms=(platform,))


def custom_calls(lowered_text: str) -> dict[str, int]:
    """Custom-call target -> count in lowered StableHLO text (``__gpu$xla.gpu.triton`` is a Pallas kernel)."""
    return dict(collections.Counter(_CUSTOM_CALL.findall(lowered_text)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    # Fake devices must be asked for before jax starts its CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={known.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from internevo_jax import config as config_lib
    from internevo_jax.initialize import get_default_parser, parse_args

    parser = get_default_parser()
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices for the mesh")
    parser.add_argument("--platform", default="cuda", choices=["cuda", "rocm", "cpu"])
    parser.add_argument("--json", default=None, help="also write the custom-call counts as JSON to this file")
    args = parse_args(parser, argv)
    overrides = [*args.overrides, "--config.ckpt.auto_resume=False", "--config.ckpt.load_ckpt_info=None"]
    try:
        config = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    with assume_hopper():
        lowered = lower_train_step(config, jax.devices()[: args.devices], args.platform)
    calls = custom_calls(lowered.as_text())
    print(f"{args.config} lowered for {args.platform} on {args.devices} device(s): attn_impl={config.model.attn_impl}")
    print("| custom call | count |\n|---|---|")
    for name, n in sorted(calls.items()):
        print(f"| `{name}` | {n} |")
    if args.json:
        Path(args.json).write_text(json.dumps(calls, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
