"""InternEvo's validation sets (D-13): one set per folder of ``.bin`` files under ``data.valid_folder``, batched.

Sets: every folder at or under ``valid_folder`` (a sorted, symlink-following pre-order walk, as ``os.walk`` with
sorted dirs) that directly holds ``.bin`` files is one set named after the folder (``basename``); the ``.bin`` files
of its subfolders belong to the subfolders' own sets. Its samples are those files' samples in sorted file order.
``valid_folder`` None means InternEvo's dummy validation data: one set ``val`` of ``RandomDataset(dp * 500)`` (D-01).

Quirk 5.12, replicated: InternEvo reads validation files with ``JsonlDataset``'s default ``min_length=50``, so
samples shorter than 50 tokens are silently left out of validation (``data.min_length`` does not apply here).
``build_valid_sets`` takes it as ``min_length`` (default ``VALID_MIN_LENGTH`` = 50) and reports the count dropped.

Batches (``DataParallelSampler``: no shuffle, drop_last): rank r reads samples ``r, r + dp, r + 2 dp, ...`` (the
first ``floor(N / dp) * dp`` samples), ``batch_rows = min(valid_micro_num * micro_bsz, N // dp)`` rounded down to a
multiple of ``micro_bsz`` at a time; a set whose ``batch_rows`` is 0 is skipped (``skip_reason`` says why).

Collate (``jsonl_ds_collate_fn``): each sample is truncated to ``seq_len``; input ``abs(token)``; label of position
j is token j + 1 if it is > 0 else -100 (so non-targets and id 0 are ignored), -100 at the end; right-padded to
``seq_len`` with token 0 / label -100.

Layout: the training batch layout ``[micro_num, dp, P]`` with ``P = micro_bsz * seq_len``, so one step function can
run both. Batch i is ``batch_rows / micro_bsz`` micro-batches per rank; micro-batch m of rank r holds that rank's
batch rows ``m * micro_bsz ... (m + 1) * micro_bsz - 1`` (InternEvo splits an eval batch into micro-batches of
``micro_bsz`` rows), each in its own ``seq_len`` slice of the P-row. In slot j: ``segment_ids`` j + 1 on the
sample's tokens and 0 on its padding (segments never attend across samples, InternEvo's unpacked path; padding
never reaches a real token, and ``max(segment_ids)`` counts the samples); ``positions`` ``arange(seq_len)`` (padding
included, as InternEvo's unpacked model); ``type_ids`` 0 (validation sets have no type folders).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import ml_collections
import numpy as np

from internevo_jax.data.dummy import DummyDataset
from internevo_jax.data.packing import IGNORE_INDEX, Samples
from internevo_jax.data.tokenized import META_SUFFIX, DataError, TokenizedFile

VALID_MIN_LENGTH = 50  # JsonlDataset's default, which InternEvo's validation files get (quirk 5.12)
DUMMY_SAMPLES_PER_RANK = 500  # InternEvo: RandomDataset(num_samples=dp * 500) without valid_folder
DUMMY_NAME = "val"


class ConcatSamples:
    """Several ``Samples`` read as one (InternEvo's ``ConcatDataset`` over a set's ``.bin`` files)."""

    def __init__(self, parts: Sequence[Samples]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.lengths = np.concatenate([np.asarray(p.lengths, np.int64) for p in parts] or [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _part(self, i: int) -> tuple[Samples, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], i - int(self.starts[k])

    def tokens(self, i: int) -> np.ndarray:
        part, j = self._part(i)
        return part.tokens(j)

    def type_id(self, i: int) -> int:
        part, j = self._part(i)
        return part.type_id(j)


def valid_batch_rows(num_samples: int, valid_micro_num: int, micro_bsz: int, dp_size: int) -> int:
    """Samples per rank per batch: ``min(valid_micro_num * micro_bsz, N // dp)`` rounded down to micro_bsz."""
    rows = min(valid_micro_num * micro_bsz, num_samples // dp_size)
    return rows // micro_bsz * micro_bsz


def rank_samples(num_samples: int, dp_size: int, rank: int) -> np.ndarray:
    """Sample indices rank ``rank`` reads, in order: ``DataParallelSampler(shuffle=False, drop_last=True)``."""
    per_rank = num_samples // dp_size  # its ceil((N - dp) / dp) when dp does not divide N
    return np.arange(per_rank * dp_size)[rank::dp_size]


def collate(samples: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``jsonl_ds_collate_fn``: (tokens, labels), each ``[len(samples), seq_len]`` int32."""
    tokens = np.zeros((len(samples), seq_len), np.int32)
    labels = np.full((len(samples), seq_len), IGNORE_INDEX, np.int32)
    for row, sample in enumerate(samples):
        s = np.asarray(sample, np.int64)[:seq_len]
        tokens[row, : len(s)] = np.abs(s)
        labels[row, : max(len(s) - 1, 0)] = np.where(s[1:] > 0, s[1:], IGNORE_INDEX)
    return tokens, labels


@dataclass
class ValidSet:
    """One validation set, batched for ``dp_size`` data-parallel ranks (layout in the module docstring)."""

    name: str
    samples: Samples
    seq_len: int
    micro_bsz: int
    dp_size: int
    batch_rows: int  # samples per rank per batch; 0 = skipped
    num_dropped: int = 0  # samples left out as shorter than min_length
    skip_reason: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_batches(self) -> int:
        return (self.num_samples // self.dp_size) // self.batch_rows if self.batch_rows else 0

    @property
    def micro_num(self) -> int:
        """Micro-batches per batch (``batch_rows / micro_bsz``, at most ``valid_micro_num``)."""
        return self.batch_rows // self.micro_bsz

    def indices(self, i: int, rows: range | None = None) -> np.ndarray:
        """``[micro_num, len(rows), micro_bsz]`` sample indices of batch i for the ranks ``rows`` (default all)."""
        if not 0 <= i < self.num_batches:
            raise IndexError(f"validation set {self.name}: batch {i} of {self.num_batches}")
        rows = range(self.dp_size) if rows is None else rows
        # Rank r's k-th sample is k * dp + r (rank_samples); batch i is its samples i * batch_rows + [0, batch_rows).
        k = (i * self.batch_rows + np.arange(self.batch_rows)).reshape(self.micro_num, 1, self.micro_bsz)
        return k * self.dp_size + np.asarray(rows).reshape(1, -1, 1)

    def batch(self, i: int, rows: range | None = None) -> dict[str, np.ndarray]:
        """Batch i for the ranks ``rows``: tokens, labels, positions, segment_ids, type_ids, each
        ``[micro_num, len(rows), micro_bsz * seq_len]`` int32."""
        index = self.indices(i, rows)
        m, r, b = index.shape
        samples = [self.samples.tokens(int(k)) for k in index.ravel()]
        tokens, labels = collate(samples, self.seq_len)
        real = np.arange(self.seq_len) < np.minimum([len(s) for s in samples], self.seq_len)[:, None]
        segments = np.where(real, np.tile(np.arange(1, b + 1), m * r)[:, None], 0).astype(np.int32)
        positions = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), tokens.shape)
        fields = dict(tokens=tokens, labels=labels, positions=positions, segment_ids=segments)
        out = {k: np.ascontiguousarray(v).reshape(m, r, b * self.seq_len) for k, v in fields.items()}
        out["type_ids"] = np.zeros_like(out["tokens"])
        return out


def find_valid_folders(folder: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """[(folder, its sorted .bin paths)] for every folder at or under ``folder`` that directly holds .bin files, in
    InternEvo's walk order (pre-order, sorted, following symlinks)."""
    root = os.path.normpath(os.fspath(folder))  # a trailing "/" would make InternEvo's basename "" (the set name)
    if not os.path.isdir(root):
        raise DataError(
            f"data.valid_folder {folder} does not exist or is not a folder; point it at a folder whose subfolders "
            "hold the validation .bin/.bin.meta files (one set per subfolder), or set it to None for dummy data"
        )
    found: list[tuple[str, list[str]]] = []

    def walk(path: str, ancestors: frozenset[str]) -> None:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        files = {e.name for e in entries if not e.is_dir()}
        for name in sorted(files):
            if name.endswith(".bin" + META_SUFFIX) and name[: -len(META_SUFFIX)] not in files:
                raise DataError(f"{os.path.join(path, name)} has no {name[: -len(META_SUFFIX)]} next to it")
        bins = [os.path.join(path, n) for n in sorted(files) if n.endswith(".bin")]
        if bins:
            found.append((path, bins))
        for e in entries:
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in ancestors:
                    raise DataError(f"{e.path} links back to {real}: a symlink cycle in data.valid_folder")
                walk(e.path, ancestors | {real})

    walk(root, frozenset({os.path.realpath(root)}))
    if not found:
        raise DataError(
            f"data.valid_folder {folder} has no .bin files in it or any folder under it; each folder holding "
            f".bin (+ .bin.meta) files is one validation set, e.g. {os.path.join(root, 'en', 'valid.bin')}"
        )
    return found


def build_valid_sets(
    data: ml_collections.ConfigDict,
    dp_size: int,
    vocab_size: int | None = None,
    min_length: int = VALID_MIN_LENGTH,
) -> list[ValidSet]:
    """InternEvo's validation sets for ``data`` (valid_folder, valid_micro_num, micro_bsz, seq_len), in walk order.

    Skipped sets are included with ``batch_rows`` 0 and a ``skip_reason`` to log. ``vocab_size`` (the model's)
    bounds the token ids read; ``min_length`` is quirk 5.12 (see the module docstring).
    """
    named: list[tuple[str, Samples, int]]  # (set name, its samples, how many min_length dropped)
    if data.valid_folder is None:
        named = [(DUMMY_NAME, DummyDataset(dp_size * DUMMY_SAMPLES_PER_RANK, data.seq_len), 0)]
    else:
        named = []
        where: dict[str, str] = {}  # set name -> its folder
        for path, bins in find_valid_folders(data.valid_folder):
            name = os.path.basename(path)
            if name in where:  # InternEvo's dict would silently keep only the later folder
                raise DataError(
                    f"validation folders {where[name]} and {path} are both named {name!r}; validation sets are "
                    "named by their folder, so rename one"
                )
            where[name] = path
            files = [TokenizedFile(b, 0, min_length, vocab_size) for b in bins]
            named.append((name, ConcatSamples(files), sum(f.num_rows - len(f) for f in files)))
    sets = []
    for name, samples, dropped in named:
        rows = valid_batch_rows(len(samples), data.valid_micro_num, data.micro_bsz, dp_size)
        reason = None
        if rows == 0:
            shorter = f" ({dropped} shorter than {min_length} tokens dropped)" if dropped else ""
            reason = (
                f"skip validate {name}: {len(samples)} samples{shorter} give {len(samples) // dp_size} per "
                f"data-parallel rank (dp {dp_size}), fewer than data.micro_bsz {data.micro_bsz}"
            )
        sets.append(ValidSet(name, samples, data.seq_len, data.micro_bsz, dp_size, rows, dropped, reason))
    return sets
