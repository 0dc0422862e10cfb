"""Which folders of a checkpoint folder are steps: ``<n>`` folders one save wrote in full, nothing else.

Orbax lists every finalized folder whose name is a number. A symlink named like a step (``9 -> 3``, or into
another run's folder) would become the latest step, and orbax's retention would ``rmtree`` it; a folder whose save
was half deleted (a run killed during retention, a hand-made folder) would be picked and fail to restore. Here a step
is a real folder (no symlink, no ``*.orbax-checkpoint-tmp``) with orbax's metadata and every file its manifest
lists; ``StepNames`` gives orbax's ``CheckpointManager`` the same listing, so its latest step, retention and ours
agree. Sizes and checksums are left to ``integrity.verify_step`` when a step is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from internevo_jax.checkpoint.integrity import MANIFEST, missing_files

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step into ``<step>.orbax-checkpoint-tmp[-<time>]``
PYTREE_METADATA = "_METADATA"  # orbax's array metadata in ``state/``: written with the arrays, read before any
# What a save of ours writes into a step folder (orbax's items and metadata, our manifest): a folder holding any of
# them is ours; one holding none is a user's folder that happens to have a number for a name.
OURS = ("state", "meta", MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")
ASIDE = ("corrupt-", "unverified-")  # ``<n>.corrupt-<time>``, ``<n>.unverified-<time>``: steps set aside


def is_tmp(path: Path) -> bool:
    return TMP_SUFFIX in path.name


def scan_steps(root: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """``(checkpoints newest first, [(entry, why it is not one)])`` among the entries of ``root`` named like a step.

    Named like a step: ``<n>`` or orbax's ``<n>.orbax-checkpoint-tmp*``; quarantined ``<n>.corrupt-*`` folders were
    reported when they were moved aside and are not looked at again. Cheap (a few stats and one directory listing
    per folder of a step); sizes and checksums are checked by ``verify_step`` when a step is chosen.
    """
    try:
        entries = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    good, skipped = [], []
    for p in entries:
        head, dot, rest = p.name.partition(".")
        if not head.isdigit() or (dot and not ("." + rest).startswith(TMP_SUFFIX)):
            continue
        problem = step_problem(p)
        if problem is None:
            good.append((int(head), p))
        else:
            skipped.append((p, problem))
    newest_first = sorted(skipped, key=lambda x: (-int(x[0].name.partition(".")[0]), x[0].name))
    return sorted(good, key=lambda x: -x[0]), newest_first


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Finalized step folders directly under ``root``, newest first (no tmp folders, symlinks, half-deleted)."""
    return scan_steps(root)[0]


def step_problem(path: Path) -> str | None:
    """Why ``path``, an entry of a checkpoint folder named like a step, is not a checkpoint; None when it is one."""
    if path.is_symlink():
        # Never a save of ours; following it would restore (and let retention delete) another folder's files.
        return f"a symlink (to {os.readlink(path)}), not a step folder"
    if is_tmp(path):
        return "an unfinished save (orbax's temporary folder)"
    if not path.is_dir():
        return "not a folder"
    if not is_step_dir(path):
        return f"no orbax metadata (state/{PYTREE_METADATA} and meta/): half-deleted, or not written by a save"
    return missing_files(path)  # files the manifest lists that are gone: half-deleted


def is_foreign(path: Path) -> bool:
    """An entry named like a step that no save of ours wrote: a plain file, or a folder with none of the files a
    save writes (a user's own numbered folder). It is left alone, never moved: it is not ours.

    A symlink is not foreign: orbax would follow it (and retention delete its target), so it is moved aside (the
    link itself is renamed, its target untouched). A folder with any of our files is ours, however incomplete.
    """
    if path.is_symlink() or is_tmp(path):
        return False
    if not path.is_dir():
        return True
    return not any((path / name).exists() for name in OURS)


def quarantined(root: Path) -> list[Path]:
    """The steps of ``root`` an earlier start set aside (``<n>.corrupt-*``, ``<n>.unverified-*``), by name."""
    try:
        entries = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        p for p in entries if p.name.partition(".")[0].isdigit() and p.name.partition(".")[2].startswith(ASIDE)
    )


def is_step_dir(path: Path) -> bool:
    """A folder one save wrote: the ``state`` item with orbax's array metadata, and the ``meta`` item."""
    return (path / "state" / PYTREE_METADATA).is_file() and (path / "meta").is_dir()


class StepNames:
    """Orbax's standard step names (``<step>``), listing only what ``step_problem`` accepts (orbax's ``NameFormat``
    protocol, by delegation)."""

    def __init__(self) -> None:
        self._standard = ocp.step.standard_name_format()

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def find_all(self, base_path: Any) -> Iterator[Any]:
        return (m for m in self._standard.find_all(base_path) if step_problem(Path(str(m.path))) is None)

    def find_step(self, base_path: Any, step: int) -> Any:
        found = self._standard.find_step(base_path, step)
        problem = step_problem(Path(str(found.path)))
        if problem is not None:
            raise ValueError(f"step {step} in {base_path} is not a checkpoint: {problem}")
        return found


def quarantined_message(folder: Path, aside: list[Path]) -> str:
    """Why a start refuses a folder that holds only steps an earlier start moved aside, and what to do."""
    names = ", ".join(p.name for p in aside[:8]) + (f" and {len(aside) - 8} more" if len(aside) > 8 else "")
    return (
        f"no usable checkpoint in {folder}, only steps an earlier start set aside as unusable ({names}). Starting "
        "from scratch would throw that run away, so every start refuses while they are there: set "
        "ckpt.auto_resume=False (--config.ckpt.auto_resume=False) to start from scratch, or remove those folders "
        "(or rename one back to <step> if you repaired it)"
    )
