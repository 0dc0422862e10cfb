"""InternEvo's three packing modes (D-05, D-06, D-07) and its train collate (D-08), by random access.

Every mode shuffles one dataset's (one ``.bin`` file's) samples with ``RandomState(1024)`` and cuts pack i of
``P = micro_bsz * seq_len`` tokens from them; ``len = floor(total_tokens / P)`` in all three (tail dropped):

- default (``PackedDatasetWithCut``, D-05): pack i is stream tokens ``[i * P, (i + 1) * P)`` of the shuffled samples.
  Every sample fragment is split into pieces of at most ``seq_len``; each piece is one attention segment whose
  positions restart at 0. Labels are computed per fragment before the split: the sample's next token, -100 after a
  sample's last token, and across a pack edge the sample's next token.
- ``pack_sample_into_one`` (``PackedDatasetWithoutCuSeqlen``, D-06): the same stream, cut into fixed ``seq_len``
  windows that ignore sample boundaries (attention crosses samples inside a window); positions are
  ``range(seq_len)`` per window; labels ``fragment[1:] + [-100]`` per fragment, so pack edges get -100 too.
- unpacked (``use_packed_dataset=False``, D-07): row j of pack i is shuffled sample ``i * micro_bsz + j`` truncated
  to ``seq_len``, labels ``tokens[1:] + [-100]``, right-padded with token 0 / label -100 (the padding is a segment
  of its own). Packs past the last sample are all padding: InternEvo keeps the token-based length here too.

The collate then feeds ``abs(token)`` and ignores labels <= 0 (InternEvo also ignores label id 0, quirk 5.6).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

IGNORE_INDEX = -100  # InternEvo's label for non-targets; the loss (ops/cross_entropy.py) skips it
SHUFFLE_SEED = 1024  # InternEvo's DEFAULT_SEED: the sample order does not depend on --seed or data.seed
# The fields of a batch (each [micro_num, micro_bsz * seq_len] int32), whichever source packed it.
FIELDS = ("tokens", "labels", "positions", "segment_ids", "type_ids")


class Samples(Protocol):
    lengths: np.ndarray

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def type_id(self, i: int) -> int: ...


class PackedDataset:
    """Random-access packs of ``micro_bsz * seq_len`` tokens over one sample source, in one of InternEvo's modes.

    ``pack_sample_into_one`` wins over ``use_packed_dataset`` as in InternEvo, where it selects another class.
    """

    def __init__(
        self,
        samples: Samples,
        seq_len: int,
        micro_bsz: int,
        pack_sample_into_one: bool = False,
        use_packed_dataset: bool = True,
    ):
        self.samples, self.seq_len, self.micro_bsz = samples, seq_len, micro_bsz
        self.mode = "into_one" if pack_sample_into_one else "cut" if use_packed_dataset else "unpacked"
        self.packed_length = seq_len * micro_bsz
        order = np.arange(len(samples))
        np.random.RandomState(SHUFFLE_SEED).shuffle(order)
        self.order = order
        self.ends = np.cumsum(np.asarray(samples.lengths, np.int64)[order])  # stream offset past each sample
        self.num_packs = int(self.ends[-1] // self.packed_length) if len(order) else 0

    def __len__(self) -> int:
        return self.num_packs

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """One pack: tokens, labels, positions, segment_ids (1-based per segment), type_ids; each [P] int32."""
        if not 0 <= i < self.num_packs:
            raise IndexError(f"pack {i} of {self.num_packs}")
        p = self.packed_length
        tokens = np.zeros(p, np.int64)
        labels = np.full(p, IGNORE_INDEX, np.int64)
        positions = np.zeros(p, np.int32)
        segments = np.zeros(p, np.int32)
        type_ids = np.zeros(p, np.int32)
        if self.mode == "unpacked":
            self._unpacked(i, tokens, labels, positions, segments, type_ids)
        else:
            at, segment = 0, 0
            for sample, full, lo, hi in self._fragments(i):
                n = hi - lo
                tokens[at : at + n] = full[lo:hi]
                labels[at : at + n - 1] = full[lo + 1 : hi]
                # D-05 trains the target across a pack edge; D-06 ends every fragment with -100.
                cut_inside = self.mode == "cut" and hi < len(full)
                labels[at + n - 1] = full[hi] if cut_inside else IGNORE_INDEX
                type_ids[at : at + n] = self.samples.type_id(sample)
                if self.mode == "cut":
                    for piece in range(0, n, self.seq_len):
                        m = min(self.seq_len, n - piece)
                        segment += 1
                        positions[at + piece : at + piece + m] = np.arange(m)
                        segments[at + piece : at + piece + m] = segment
                at += n
            if self.mode == "into_one":
                positions[:] = np.tile(np.arange(self.seq_len), self.micro_bsz)
                segments[:] = np.repeat(np.arange(1, self.micro_bsz + 1), self.seq_len)
        labels = np.where(labels > 0, labels, IGNORE_INDEX)
        return dict(
            tokens=np.abs(tokens).astype(np.int32),
            labels=labels.astype(np.int32),
            positions=positions,
            segment_ids=segments,
            type_ids=type_ids,
        )

    def _fragments(self, i: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """(sample, its tokens, lo, hi) for each sample slice ``tokens[lo:hi]`` inside pack i, in stream order."""
        start, stop = i * self.packed_length, (i + 1) * self.packed_length
        k = int(np.searchsorted(self.ends, start, side="right"))  # first sample overlapping the pack
        while k < len(self.ends) and self.ends[k] - self.samples.lengths[self.order[k]] < stop:
            sample = int(self.order[k])
            sample_start = int(self.ends[k]) - int(self.samples.lengths[sample])
            lo, hi = max(start, sample_start) - sample_start, min(stop, int(self.ends[k])) - sample_start
            if hi > lo:  # zero-length samples (min_length 0) contribute nothing
                yield sample, self.samples.tokens(sample), lo, hi
            k += 1

    def _unpacked(
        self,
        i: int,
        tokens: np.ndarray,
        labels: np.ndarray,
        positions: np.ndarray,
        segments: np.ndarray,
        type_ids: np.ndarray,
    ) -> None:
        """Fills pack i in place: row j is shuffled sample ``i * micro_bsz + j``, truncated, then padded."""
        s, segment = self.seq_len, 0
        for j, k in enumerate(range(i * self.micro_bsz, (i + 1) * self.micro_bsz)):
            row = j * s
            sample = int(self.order[k]) if k < len(self.order) else None
            chunk = self.samples.tokens(sample)[:s] if sample is not None else tokens[:0]
            n = len(chunk)
            if sample is not None and n:  # (n is 0 when sample is None)
                tokens[row : row + n] = chunk
                labels[row : row + n - 1] = chunk[1:]  # the last label stays -100
                type_ids[row : row + n] = self.samples.type_id(sample)
                positions[row : row + n] = np.arange(n)
                segment += 1
                segments[row : row + n] = segment
            if n < s:  # padding: token 0, label -100, type 0, a segment of its own
                segment += 1
                positions[row + n : row + s] = np.arange(s - n)
                segments[row + n : row + s] = segment


class ConcatPacks:
    """InternEvo's ``ConcatDataset`` over per-file packed datasets: pack indices run through them in order."""

    def __init__(self, parts: Sequence[PackedDataset]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - int(self.starts[k])]


def batch_stats(segment_ids: np.ndarray) -> dict[str, int]:
    """InternEvo's per-step packing stats over one rank's micro-batches ``[micro_num, P]``.

    The log line's ``num_samples_in_batch``, ``largest_length``, ``largest_batch``, ``smallest_batch``
    (docs/internevo_parity.md#log-line).
    """
    per_micro = segment_ids.max(axis=-1)
    lengths = [np.bincount(row)[1:] for row in segment_ids]
    return dict(
        num_samples_in_batch=int(per_micro.sum()),
        largest_length=int(max(length.max() for length in lengths)),
        largest_batch=int(per_micro.max()),
        smallest_batch=int(per_micro.min()),
    )
