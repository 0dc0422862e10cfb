"""``metrics.jsonl`` across restarts: a resumed run continues the file, without the rows of the branch it dropped.

A run that resumes checkpoint ``k`` trains batches ``k, k+1, ...`` again; the rows an earlier attempt wrote for them
(the attempt that crashed or was stopped after ``k``) would otherwise stay in the file beside the new ones, two
rows per step from two histories. TensorBoard drops such events itself (``purge_step``); this does the same for the
JSON-lines file, keeping the dropped rows in a file beside it rather than deleting them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SUPERSEDED = "metrics.superseded.jsonl"  # beside metrics.jsonl: rows of attempts a resume went back behind


def set_aside_rows(path: Path, start: int) -> int:
    """Before a run continues at batch ``start``: moves the rows an earlier attempt wrote for batches ``start`` on
    (the branch a crash or a stop threw away; a validation row at ``start`` itself belongs to the checkpoint and
    stays) and lines cut short by a kill, from ``path`` to ``metrics.superseded.jsonl`` beside it, so the file holds
    one row per step of the run's one history. ``path`` is replaced atomically (a temp file renamed over it) after
    the moved rows are on disk, so a crash here loses no row. Returns the number of lines moved."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    keep: list[str] = []
    moved: list[str] = []
    for line in lines:
        try:
            row = json.loads(line)
            stale = row["step"] > start or (row["step"] == start and not any(k.startswith("val/") for k in row))
        except (ValueError, KeyError, TypeError):
            stale = True
        (moved if stale else keep).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0
    with open(path.parent / SUPERSEDED, "a", encoding="utf-8") as f:
        f.writelines(moved)
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(moved)
