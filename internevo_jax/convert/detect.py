"""Which checkpoint format a folder holds, sniffed from its files (no tensor read): the one place that knows the
markers of each format, for the converter, ``generate`` and ``ckpt.load_ckpt_info``."""

from __future__ import annotations

import os
from pathlib import Path

from internevo_jax.checkpoint.step_folders import is_step_dir, step_dirs
from internevo_jax.config import local_path
from internevo_jax.convert.meta_llama import is_llama_folder
from internevo_jax.convert.torch_ckpt import is_internevo_folder

FORMATS = ("hf", "llama", "internevo", "internevo_jax")


def is_ours(path: Path) -> bool:
    """One of our step folders, or a folder of them (a run's ``save_ckpt_folder``, snapshots included)."""
    return is_step_dir(path) or bool(step_dirs(path)) or bool(step_dirs(path / "snapshot"))


def detect(path: str | os.PathLike) -> str | None:
    """``hf`` (``config.json``, safetensors or not: the HF reader says what is missing), ``llama`` (Meta's
    ``consolidated.00.pth`` + ``params.json``), ``internevo`` (InternEvo's ``model_tp*_pp*.pt`` files or ``{step}.step``
    markers) or ``internevo_jax`` (ours); None for a folder that is none of them or no folder at all.

    A folder of our step folders that also holds a ``config.json`` (a run folder) is ours unless safetensors files
    sit beside it; an InternEvo save folder also has numbered folders, so it is tested before ours.
    """
    p = Path(local_path(str(path)))
    if not p.is_dir():
        return None
    ours = is_ours(p)
    if (p / "config.json").is_file() and (not ours or any(p.glob("*.safetensors"))):
        return "hf"
    if is_llama_folder(p):
        return "llama"
    if is_internevo_folder(p):
        return "internevo"
    return "internevo_jax" if ours else None
