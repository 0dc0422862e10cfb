"""InternEvo's packing (D-05 ``PackedDatasetWithCut``) and collate (D-08), by random access.

The shuffled samples form one token stream; pack i is stream tokens ``[i * P, (i + 1) * P)`` with
``P = micro_bsz * seq_len``. Inside a pack every sample fragment is split into pieces of at most ``seq_len``;
each piece is one attention segment whose positions restart at 0. Labels are computed per fragment before the
split: the next token of the sample, -100 after a sample's last token, and across a pack edge the sample's next
token. The collate then feeds ``abs(token)`` and ignores labels <= 0 (InternEvo also ignores label id 0, quirk 5.6).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

IGNORE_INDEX = -100
SHUFFLE_SEED = 1024  # InternEvo's DEFAULT_SEED: the sample order does not depend on --seed or data.seed


class Samples(Protocol):
    lengths: np.ndarray

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def type_id(self, i: int) -> int: ...


class PackedDataset:
    """Random-access packs of ``micro_bsz * seq_len`` tokens over a sample source."""

    def __init__(self, samples: Samples, seq_len: int, micro_bsz: int):
        self.samples, self.seq_len = samples, seq_len
        self.packed_length = seq_len * micro_bsz
        order = np.arange(len(samples))
        np.random.RandomState(SHUFFLE_SEED).shuffle(order)
        self.order = order
        self.ends = np.cumsum(samples.lengths[order])  # stream offset just past each shuffled sample
        self.num_packs = int(self.ends[-1] // self.packed_length) if len(order) else 0

    def __len__(self) -> int:
        return self.num_packs

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """One pack: tokens, labels, positions, segment_ids (1-based per piece), type_ids; each [P] int32."""
        p = self.packed_length
        start, stop = i * p, (i + 1) * p
        tokens = np.empty(p, np.int64)
        labels = np.empty(p, np.int64)
        positions = np.empty(p, np.int32)
        segments = np.empty(p, np.int32)
        type_ids = np.empty(p, np.int32)
        k = int(np.searchsorted(self.ends, start, side="right"))  # first sample overlapping the pack
        at, segment = 0, 0
        while at < p:
            sample = int(self.order[k])
            sample_start = int(self.ends[k]) - int(self.samples.lengths[sample])
            lo, hi = max(start, sample_start) - sample_start, min(stop, int(self.ends[k])) - sample_start
            full = self.samples.tokens(sample)
            chunk = full[lo:hi]
            n = len(chunk)
            tokens[at : at + n] = chunk
            labels[at : at + n - 1] = chunk[1:]
            labels[at + n - 1] = full[hi] if hi < len(full) else IGNORE_INDEX
            type_ids[at : at + n] = self.samples.type_id(sample)
            for piece in range(0, n, self.seq_len):
                m = min(self.seq_len, n - piece)
                segment += 1
                positions[at + piece : at + piece + m] = np.arange(m)
                segments[at + piece : at + piece + m] = segment
            at += n
            k += 1
        labels = np.where(labels > 0, labels, IGNORE_INDEX)
        return dict(
            tokens=np.abs(tokens).astype(np.int32),
            labels=labels.astype(np.int32),
            positions=positions,
            segment_ids=segments,
            type_ids=type_ids,
        )
