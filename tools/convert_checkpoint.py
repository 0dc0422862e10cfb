"""Convert model weights between our orbax checkpoints and Hugging Face folders.

    # ours -> HF (a run's checkpoint folder -> its newest verified step, or one step folder; --step picks another)
    python tools/convert_checkpoint.py --src /ckpt/run1 --dst /models/run1-hf [--step 3000] [--dtype bfloat16]
    # HF -> ours: a checkpoint folder holding one step (the weights only), for ckpt.load_ckpt_info with
    # ckpt_type='internevo', content=('model',), or for auto_resume as the run's ckpt.save_ckpt_folder
    python tools/convert_checkpoint.py --src /models/Llama-2-7b-hf --dst /ckpt/llama2 --config=configs/llama2_7b.py

The direction follows the source (a folder with ``config.json`` is Hugging Face; ``--src_format`` overrides).
``--config`` (plus ``--config.model.x=v`` overrides) gives the model section: for HF -> ours it is required and
checked against ``config.json``; for ours -> HF it defaults to the config the checkpoint was saved with. The output
is written into a temporary folder beside ``--dst`` and renamed onto it when complete, so ``--dst`` is never half
written; an existing non-empty ``--dst`` is refused unless ``--force`` (then it is replaced, also atomically).
Runs on the CPU: no accelerator needed. Exit codes: 0 done, 2 bad arguments or config, 3 checkpoint error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without `pip install -e .`
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from internevo_jax import checkpoint as checkpoint_lib  # noqa: E402
from internevo_jax import config as config_lib  # noqa: E402
from internevo_jax import convert, resume  # noqa: E402
from internevo_jax.initialize import parse_args as parse_config_args  # noqa: E402
from internevo_jax.model import build_model  # noqa: E402

FORMATS = ("auto", "internevo_jax", "hf")
NOT_YET = ("internevo", "llama")  # InternEvo's PyTorch layout and Meta's consolidated weights: not readable yet
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ConvertError(RuntimeError):
    """A conversion that cannot go on; the message names the path and the fix."""


def detect(src: Path) -> str:
    """``hf`` for a folder with ``config.json``, ``internevo_jax`` for a step folder or a folder of step folders."""
    if not src.is_dir():
        raise ConvertError(f"--src {src} does not exist or is not a folder")
    if (src / "config.json").is_file():
        return "hf"
    if checkpoint_lib.is_step_dir(src) or checkpoint_lib.step_dirs(src) or checkpoint_lib.step_dirs(src / "snapshot"):
        return "internevo_jax"
    raise ConvertError(
        f"--src {src} is neither a Hugging Face folder (config.json + *.safetensors) nor one of our checkpoints (a "
        "step folder with state/ and meta/, or a folder of numbered step folders); give --src_format if it is"
    )


def step_folder(src: Path, step: int | None) -> Path:
    """The step folder to read: ``--step`` in ``src`` (or its snapshots), else the newest verified one."""
    if step is None:
        return resume.find_step(str(src))
    for folder in (src / str(step), src / "snapshot" / str(step)):
        if checkpoint_lib.is_step_dir(folder):
            return resume.find_step(str(folder))
    have = [s for s, _ in checkpoint_lib.step_dirs(src) + checkpoint_lib.step_dirs(src / "snapshot")]
    raise ConvertError(f"--step {step}: {src} has no such step folder; it has steps {sorted(have)}")


def saved_config(step_dir: Path) -> Any:
    """The model part of the config a checkpoint was saved with (model_type, model, and what validation needs)."""
    try:
        saved = json.loads(checkpoint_lib.read_meta(step_dir)["config"])
    except Exception as e:
        raise ConvertError(
            f"{step_dir} holds no readable config ({e}); give --config=FILE for its model section"
        ) from e

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        return float(value) if value in ("inf", "-inf") else value

    data = {k: saved["data"][k] for k in ("seq_len", "micro_bsz")}
    return config_lib.build(
        dict(
            model_type=saved["model_type"], model=decode(saved["model"]), data=data, ckpt=dict(enable_save_ckpt=False)
        ),
        source=f"{step_dir} (saved)",
    )


def abstract_params(cfg: Any) -> dict[str, Any]:
    """The model's params as ShapeDtypeStructs (fp32 masters), nothing allocated."""
    return jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg.model_type, cfg.model, nnx.Rngs(0)))))


def read_params(step_dir: Path, cfg: Any) -> dict[str, Any]:
    """The params of a step folder as numpy arrays, checked against the config by name and shape first."""
    abstract = abstract_params(cfg)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    targets = {
        f"params.{name}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)
        for name, a in checkpoint_lib.array_names(abstract).items()
    }
    checkpoint_lib.check_fits(step_dir, targets)
    arrays = checkpoint_lib.read_arrays(step_dir, targets)
    leaves = [np.asarray(arrays[name]) for name in targets]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def to_hf(src: Path, dst: Path, cfg: Any, step: int | None, dtype: str | None, layout: str, tokenizer: str | None):
    step_dir = step_folder(src, step)
    cfg = cfg or saved_config(step_dir)
    params = read_params(step_dir, cfg)

    def write(tmp: Path) -> None:
        convert.save_hf(params, cfg.model, tmp / "out", layout=layout, dtype=dtype)
        for f in tokenizer_files(tokenizer):
            shutil.copy2(f, tmp / "out" / f.name)
        (tmp / "out").rename(tmp / "final")

    atomic_folder(dst, write)
    return step_dir


def tokenizer_files(tokenizer: str | None) -> list[Path]:
    if tokenizer is None:
        return []
    path = Path(tokenizer)
    files = [path] if path.is_file() else [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not files:
        raise ConvertError(f"--tokenizer {path}: no tokenizer file there (looked for {', '.join(TOKENIZER_FILES)})")
    return files


def to_ours(src: Path, dst: Path, cfg: Any, step: int | None) -> Path:
    if cfg is None:
        raise ConvertError(
            "--config=FILE is needed to write our checkpoint: the config the run will train with (its model section "
            f"must match {src / 'config.json'}; convert.model_overrides(config) lists the values)"
        )
    params = convert.load_hf(src, cfg.model)  # checks every model.* key against config.json, and every shape
    cpu = jax.devices("cpu")[0]
    state = {"params": jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32), cpu), params)}
    step = 0 if step is None else step
    meta = dict(
        batch_count=0,
        step_count=0,
        num_consumed_tokens=0,
        data_state=None,
        config=config_lib.to_json(cfg),
        converted_from=str(src.absolute()),
    )

    def write(tmp: Path) -> None:
        ckpt = config_lib.default_config().ckpt
        ckpt.update(dict(save_ckpt_folder=str(tmp / "final"), checkpoint_every=1))
        writer = checkpoint_lib.Checkpointer(ckpt, job_name="convert_checkpoint")
        try:
            writer.save(step, state, meta)
        finally:
            writer.close()  # waits for the async write and the manifest; releases the folder's lock

    atomic_folder(dst, write)
    return dst / str(step)


def atomic_folder(dst: Path, write: Any) -> None:
    """Runs ``write(tmp)``, which must leave the result in ``tmp/final``, then renames it onto ``dst``."""
    dst = dst.absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        if not (dst.exists() or dst.is_symlink()):
            os.rename(tmp / "final", dst)
            return
        os.rename(dst, tmp / "old")  # --force: the replaced output stays whole until the new one is in place
        try:
            os.rename(tmp / "final", dst)
        except BaseException:
            os.rename(tmp / "old", dst)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument("--src", required=True, help="our checkpoint (a run's folder or a step folder) or an HF folder")
    parser.add_argument("--dst", required=True, help="the folder to write (refused if it exists and is not empty)")
    parser.add_argument("--src_format", default="auto", choices=FORMATS + NOT_YET, help="default: detected")
    parser.add_argument("--dst_format", default="auto", choices=FORMATS, help="default: the other format")
    parser.add_argument("--config", default=None, help="config .py file for the model section (see above)")
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="ours -> HF: the step (default: newest verified); HF -> ours: the step to write (default 0)",
    )
    parser.add_argument("--dtype", default=None, help="HF output dtype, e.g. bfloat16 (default: float32 as saved)")
    parser.add_argument("--layout", default="llama", choices=("llama", "internlm2"), help="HF output layout")
    parser.add_argument("--tokenizer", default=None, help="ours -> HF: a tokenizer file or folder to copy along")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --dst")
    return parse_config_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, dst = Path(config_lib.local_path(args.src)), Path(config_lib.local_path(args.dst))
    t0 = time.time()
    try:
        if args.src_format in NOT_YET:
            raise ConvertError(
                f"--src_format {args.src_format} cannot be read yet; convert it to a Hugging Face folder with "
                "InternEvo's tools (tools/convert2hf) first, then use --src_format hf"
            )
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.force:
            raise ConvertError(
                f"--dst {dst} exists and is not empty; choose a new folder, or pass --force to replace it"
            )
        if dst.absolute() == src.absolute() or dst.absolute() in src.absolute().parents:
            raise ConvertError(f"--dst {dst} would replace --src {src}; write somewhere else")
        src_format = detect(src) if args.src_format == "auto" else args.src_format
        dst_format = (
            {"hf": "internevo_jax", "internevo_jax": "hf"}[src_format] if args.dst_format == "auto" else args.dst_format
        )
        if src_format == dst_format:
            raise ConvertError(f"--src and --dst are both {src_format}; nothing to convert")
        cfg = config_lib.load(args.config, args.overrides) if args.config else None
        if args.overrides and cfg is None:
            raise ConvertError("--config.* overrides need --config=FILE")
        if dst_format == "hf":
            used = to_hf(src, dst, cfg, args.step, args.dtype, args.layout, args.tokenizer)
        else:
            if args.dtype not in (None, "float32"):
                raise ConvertError("our checkpoints hold float32 master weights; --dtype applies to HF output only")
            used = to_ours(src, dst, cfg, args.step)
    except (ConvertError, config_lib.ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except checkpoint_lib.CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 3
    print(f"wrote {dst} ({dst_format}) from {used} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
