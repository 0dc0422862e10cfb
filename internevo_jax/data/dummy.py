"""InternEvo's ``RandomDataset`` (D-01): learnable integer ranges, fixed by ``RandomState(1999)``."""

from __future__ import annotations

import numpy as np

DATASET_TYPES = ("en", "cn", "code")  # what InternEvo reports for dummy data; every token has type 0


class DummyDataset:
    """Sample i is ``([n, r] + list(range(n)) * r)[:max_len]`` with n in [1, 30), r in [10, 200).

    All n are drawn first, then all r, so the data never depends on ``--seed``. Samples are generated on
    access; only the (n, r) pairs are stored.
    """

    def __init__(self, num_samples: int, max_len: int, fixed_seqlen: bool = False):
        rng = np.random.RandomState(1999)
        self.n = rng.randint(1, 30, size=num_samples)
        self.r = rng.randint(10, 200, size=num_samples)
        if fixed_seqlen:
            # InternEvo doubles r until the repeated range reaches max_len, then truncates.
            while np.any(short := self.n * self.r < max_len):
                self.r = np.where(short, self.r * 2, self.r)
        self.max_len = max_len
        self.lengths = np.minimum(2 + self.n * self.r, max_len).astype(np.int64)

    def __len__(self) -> int:
        return len(self.n)

    def tokens(self, i: int) -> np.ndarray:
        n, r = int(self.n[i]), int(self.r[i])
        return np.concatenate([[n, r], np.tile(np.arange(n), r)])[: self.max_len].astype(np.int64)

    def type_id(self, i: int) -> int:
        return 0

    def max_token_id(self) -> int:
        """The largest token id of any sample: its leading n or r (the range repeated is below n); only n when a
        sample is cut to one token."""
        return int(max(self.n.max(), self.r.max() if self.max_len >= 2 else 0))
