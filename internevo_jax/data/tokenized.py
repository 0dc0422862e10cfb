"""InternEvo's tokenized datasets (D-02..D-04): ``train_folder/<type>/**/*.bin`` JSON lines plus ``.bin.meta`` indexes.

A ``.bin`` holds one ``{"tokens": [...]}`` JSON object per line (only ``tokens`` is read; negative ids are inputs
that are not targets). ``<name>.bin.meta`` is an ``np.save``-d integer array (N, 2) of ``[byte offset of the line,
token count]`` (InternEvo's tokenizer writes int32, its alpaca tool int64; both are read). Type ids are the indices
of the sorted top-level folder names of ``train_folder``; every ``.bin`` is its own dataset.

A bad file fails with its path, line and byte offset: the meta is checked when the file is opened (shape, dtype,
offsets inside the ``.bin``, a sample of them at line starts); each line is checked when it is read (JSON, line start,
token count against the meta, token ids against the vocabulary).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from internevo_jax.errors import DataError

META_SUFFIX = ".meta"
EAGER_LINE_START_CHECKS = 16  # rows checked per file at open: a full check would read a page per line of the corpus
# A read guesses the line's bytes from its token count (json.dumps spends 8 bytes on a 6-digit id), so one pread
# fetches the whole line; a longer line takes more reads.
BYTES_PER_TOKEN, LINE_SLACK = 9, 64
WHERE_BLOCK = 1 << 24  # bytes per read when counting lines for an error message
# The exact line InternEvo's tools write (json.dumps defaults); such lines skip json.loads (see _fast_tokens).
FAST_PREFIX, FAST_SUFFIX = b'{"tokens": [', b"]}"
DIGITS = b"0123456789"
INT64 = np.iinfo(np.int64)


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[io.BufferedWriter]]:
    """Binary files written beside ``paths`` and renamed onto them only if the block succeeds, so a writer that dies
    leaves no half file (the tools' rule for ``.bin``/``.meta``/``.jsonl`` outputs).

    On success each file is fsynced and given the usual permissions (mkstemp makes owner-only files). Existing
    targets after the first are removed before the first rename: for a ``(.bin, .meta)`` pair a crash between the
    renames leaves a ``.bin`` without ``.meta``, which the loader names, never a new ``.bin`` with a stale index.
    """
    targets = [Path(p) for p in paths]
    tmps: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            files: list[io.BufferedWriter] = []
            for path in targets:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                tmps.append(tmp)
                files.append(stack.enter_context(os.fdopen(fd, "wb")))
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        for tmp in tmps:
            os.chmod(tmp, 0o666 & ~umask)
        for path in targets[1:]:
            path.unlink(missing_ok=True)
        for tmp, path in zip(tmps, targets, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            Path(tmp).unlink(missing_ok=True)


class TokenizedFile:
    """One ``.bin`` file as a ``Samples`` source (see ``packing.py``): lengths, tokens(i), type_id(i).

    Samples shorter than ``min_length`` tokens are dropped (InternEvo's ``JsonlDataset``). ``vocab_size`` (if given)
    bounds token ids to ``[-(vocab_size - 1), vocab_size)``. The file is opened on first read and read with
    ``os.pread``, which has no shared file position (grain's reader threads share one instance) and, unlike a memory
    map, takes no page fault per touched page (those cost ~100 us each on virtual machines, more than parsing a line).
    """

    def __init__(self, path: str | os.PathLike, type_id: int, min_length: int = 0, vocab_size: int | None = None):
        self.path = Path(path)
        self._type_id, self.vocab_size = type_id, vocab_size
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such .bin file")
        # Next to the .bin, or (InternEvo's place) next to the file a symlinked .bin resolves to.
        candidates = dict.fromkeys([Path(f"{self.path}{META_SUFFIX}"), Path(f"{self.path.resolve()}{META_SUFFIX}")])
        found = [m for m in candidates if m.is_file()]
        if not found:
            raise DataError(
                f"{self.path}: no index {self.path.name}{META_SUFFIX} (looked for {', '.join(map(str, candidates))}); "
                "write both with tools/tokenizer.py"
            )
        self.meta_path = found[0]
        self.size = self.path.stat().st_size
        self._fd: int | None = None
        self._lock = threading.Lock()
        offsets, lengths = self._read_meta()
        self.num_rows = len(offsets)
        self.rows = np.flatnonzero(lengths >= min_length) if min_length > 0 else np.arange(self.num_rows)
        self.offsets, self.lengths = offsets[self.rows], lengths[self.rows]

    def _read_meta(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            meta = np.load(self.meta_path, allow_pickle=False)
        except Exception as err:
            raise DataError(f"{self.meta_path}: not a NumPy .npy index of [offset, length] rows ({err})") from err
        if meta.size == 0:  # InternEvo's tokenizer saves an empty list as shape (0,)
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if meta.ndim != 2 or meta.shape[1] < 2 or meta.dtype.kind not in "iu":
            raise DataError(
                f"{self.meta_path}: expected an integer array of shape (N, 2) [byte offset, token count], "
                f"got {meta.dtype} {meta.shape}"
            )
        offsets, lengths = meta[:, 0].astype(np.int64), meta[:, -1].astype(np.int64)
        for name, bad in (
            ("a negative byte offset (an int32 index that overflowed past 2 GiB?)", offsets < 0),
            (f"a byte offset past the end of the {self.size}-byte .bin", offsets >= self.size),
            ("a negative token count", lengths < 0),
        ):
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{self.meta_path}: row {row} has {name}: offset {offsets[row]}, count {lengths[row]} "
                    f"({int(bad.sum())} such rows); regenerate the index"
                )
        picks = np.unique(np.linspace(0, len(offsets) - 1, min(len(offsets), EAGER_LINE_START_CHECKS)).astype(int))
        for row in picks:
            offset = int(offsets[row])
            self._check_line_start(os.pread(self._file(), 1, offset - 1) if offset else b"", int(row), offset)
        return offsets, lengths

    def __len__(self) -> int:
        return len(self.offsets)

    def type_id(self, i: int) -> int:
        return self._type_id

    def tokens(self, i: int) -> np.ndarray:
        """Sample i's token ids (int64, negative = not a target), checked against its line and the vocabulary."""
        row, offset = int(self.rows[i]), int(self.offsets[i])
        line = self._line(row, offset, int(self.lengths[i]))
        tokens = _fast_tokens(line)
        if tokens is not None and len(tokens) == self.lengths[i]:
            return self._check_vocab(offset, tokens)
        try:  # anything else goes through json, which also words the errors
            tokens = np.asarray(json.loads(line)["tokens"])
            if tokens.ndim != 1 or (len(tokens) and tokens.dtype.kind != "i"):
                raise TypeError(f"tokens must be a list of integers, got {tokens.dtype} {tokens.shape}")
            tokens = tokens.astype(np.int64)
        except Exception as err:
            snippet = line[:120].decode("utf-8", "replace")
            raise DataError(
                f'{self._where(offset)}: malformed line, expected {{"tokens": [int, ...]}} '
                f"({type(err).__name__}: {err}): {snippet!r}"
            ) from err
        if len(tokens) != self.lengths[i]:
            raise DataError(
                f"{self._where(offset)}: the line has {len(tokens)} tokens but row {row} of "
                f"{self.meta_path.name} says {self.lengths[i]}; the .bin and its index disagree"
            )
        return self._check_vocab(offset, tokens)

    def _check_vocab(self, offset: int, tokens: np.ndarray) -> np.ndarray:
        v = self.vocab_size
        if v is not None and len(tokens) and (tokens.min() <= -v or tokens.max() >= v):
            bad = int(tokens[(tokens <= -v) | (tokens >= v)][0])
            raise DataError(
                f"{self._where(offset)}: token id {bad} is outside [-{v - 1}, {v}) for model.vocab_size {v} "
                "(negative ids mark non-targets)"
            )
        return tokens

    def _file(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = _open(self.path)
                    weakref.finalize(self, os.close, self._fd)  # closed with the instance, as a memory map would be
        return self._fd

    def _line(self, row: int, offset: int, count: int) -> bytes:
        """The line at ``offset`` without its newline; the byte before it must be the previous line's newline."""
        fd, start = self._file(), max(offset - 1, 0)
        chunk = os.pread(fd, count * BYTES_PER_TOKEN + LINE_SLACK, start)
        self._check_line_start(chunk[:1], row, offset)
        skip = offset - start
        while (end := chunk.find(b"\n", skip)) < 0 and start + len(chunk) < self.size:
            more = os.pread(fd, len(chunk), start + len(chunk))  # longer than guessed: double the read
            if not more:  # the file shrank since it was opened; the token count check names the line
                break
            chunk += more
        return chunk[skip : len(chunk) if end < 0 else end]

    def _check_line_start(self, before: bytes, row: int, offset: int) -> None:
        """``before`` is the byte at ``offset - 1`` (not looked at for offset 0)."""
        if offset > 0 and before != b"\n":
            raise DataError(
                f"{self._where(offset)}: row {row} of {self.meta_path.name} points inside a line, "
                "not at a line start; regenerate the index"
            )

    def _where(self, offset: int) -> str:
        # Only on the error path: counting newlines up to the offset reads the file that far.
        line, at = 1, 0
        while at < offset:
            block = os.pread(self._file(), min(WHERE_BLOCK, offset - at), at)
            line, at = line + block.count(b"\n"), at + len(block)
        return f"{self.path}, line {line} (byte offset {offset})"


def _fast_tokens(line: bytes) -> np.ndarray | None:
    """The ids of a ``{"tokens": [1, -2, ...]}`` line in ``json.dumps``'s exact layout, else None (use json).

    ``np.fromstring`` parses the numbers ~5x faster than ``json.loads`` + ``np.asarray``, which dominated the loader's
    time, but it is lenient (an empty number or a lone "-" reads as 0, an int64 overflow clamps). So the line must
    have json.dumps's shape: with its digits removed, ", " between numbers and a "-" before each negative one; and
    no value may be 0 or sit at the int64 limits. Anything else goes through json, which reads it or words the error.
    Leading zeros are the one thing read here that json would reject.
    """
    if not (line.startswith(FAST_PREFIX) and line.endswith(FAST_SUFFIX)):
        return None
    inner = line[len(FAST_PREFIX) : -len(FAST_SUFFIX)]
    try:
        tokens = np.fromstring(inner, dtype=np.int64, sep=",")
    except ValueError:  # unparsable text (NumPy 2; NumPy 1 warns and stops early, which the shape check catches)
        return None
    if not tokens.all():  # an empty number or a lone "-" reads as 0, so a 0 might be either
        return None
    rest = inner.translate(None, DIGITS)  # "-, , -, " for [-1, 2, -3, 4]
    shape = rest.replace(b", -", b", ")
    shape = shape[1:] if shape.startswith(b"-") else shape
    if shape != b", " * (len(tokens) - 1) or rest.count(b"-") != np.count_nonzero(tokens < 0):
        return None
    if len(tokens) and (tokens.max() == INT64.max or tokens.min() == INT64.min):
        return None
    return tokens


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno == errno.EMFILE:
            raise DataError(f"{path}: too many open files; each open .bin keeps one, raise `ulimit -n`") from err
        raise


def type_names(folder: str | os.PathLike[str]) -> list[str]:
    """The dataset types of ``folder``: its sorted top-level folder names (type id = index, D-04)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def find_bin_files(folder: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(type names, [(.bin path, type id)]) in InternEvo's order: a sorted, symlink-following pre-order walk.

    Raises ``DataError`` for a missing folder, a ``.bin`` directly in ``folder``, a ``.meta`` without its ``.bin``
    and a symlink cycle (a ``.bin`` without its ``.meta`` fails when ``TokenizedFile`` opens it).
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist or is not a folder")
    names = type_names(root)
    found: list[tuple[str, int]] = []

    def walk(path: str, type_id: int | None, ancestors: frozenset[str]) -> None:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        files = {e.name for e in entries if not e.is_dir()}
        for name in sorted(files):
            fp = os.path.join(path, name)
            if name.endswith(".bin"):
                if type_id is None:
                    raise DataError(
                        f"{fp} is directly in the data folder; InternEvo reads <folder>/<type>/**/*.bin, where the "
                        "top-level folder names are the dataset types (e.g. cn/, en/, code/)"
                    )
                found.append((fp, type_id))
            elif name.endswith(".bin" + META_SUFFIX) and name[: -len(META_SUFFIX)] not in files:
                raise DataError(f"{fp} has no {name[: -len(META_SUFFIX)]} next to it (a half-written dataset?)")
        for e in entries:
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in ancestors:
                    raise DataError(f"{e.path} links back to {real}: a symlink cycle in the data folder")
                walk(e.path, names.index(e.name) if type_id is None else type_id, ancestors | {real})

    walk(root, None, frozenset({os.path.realpath(root)}))
    return names, found


def min_length_for(path: str, min_length: int, min_length_dict: dict | None) -> int:
    """InternEvo's per-file ``min_length``: the value of the one ``min_length_dict`` key inside ``path``, if any."""
    table = min_length_dict or {}
    keys = [k for k in table if k in path]
    if len(keys) > 1:
        raise DataError(f"{path} matches several data.min_length_dict keys {keys}; at most one may match")
    return table[keys[0]] if keys else min_length


def open_folder(
    folder: str | os.PathLike, min_length: int = 0, min_length_dict: dict | None = None, vocab_size: int | None = None
) -> tuple[list[str], list[TokenizedFile]]:
    """(type names, one ``TokenizedFile`` per ``.bin``) for an InternEvo tokenized folder."""
    names, bins = find_bin_files(folder)
    if not bins:
        raise DataError(f"data folder {folder} has no .bin files under its type folders {names}")
    files = [
        TokenizedFile(path, type_id, min_length_for(path, min_length, min_length_dict), vocab_size)
        for path, type_id in bins
    ]
    return names, files
