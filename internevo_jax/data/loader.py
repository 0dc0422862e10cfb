"""The training loader: InternEvo's ``StaticBatchSampler`` order (D-10) as a random-access, resumable grain pipeline.

Step ``s`` of data-parallel rank ``r`` reads packs ``order[s * micro_num * dp + r :: dp][:micro_num]`` of the current
epoch's shuffle (``RandomState(data.seed)``, reshuffled with the continuing RNG at each epoch wrap, D-14). Because a
batch is a pure function of the step, the iterator state is just the next step, and a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from internevo_jax.config import ConfigError
from internevo_jax.data.dummy import DATASET_TYPES, DummyDataset
from internevo_jax.data.packing import ConcatPacks, PackedDataset
from internevo_jax.data.tokenized import DataError, open_folder

FIELDS = ("tokens", "labels", "positions", "segment_ids", "type_ids")


class BatchSchedule:
    """Which packs each data-parallel rank reads at each step (``StaticBatchSampler``, drop_last, D-10/D-11).

    Each epoch shuffles all packs with one continuing ``RandomState(data.seed)``; rank r's list is ``order[r::dp]``
    and step s takes its next ``micro_num(s)`` packs. With ``rampup_batch_size`` the first epoch reserves the ramp's
    packs ahead of the full-size steps (D-11); later epochs take full-size chunks of the same truncated list.
    """

    def __init__(self, num_packs: int, micro_num: int, dp_size: int, seed: int, rampup: str = ""):
        self.num_packs, self.micro_num, self.dp_size = num_packs, micro_num, dp_size
        self.ramp = parse_rampup(rampup, micro_num)
        self.ramp_sizes = [self.micro_num_at(s) for s in range(self._ramp_steps())]
        reserve = sum(self.ramp_sizes) * dp_size
        full = (num_packs - reserve) // (micro_num * dp_size)
        if full <= 0:
            raise ConfigError(
                f"the dataset has {num_packs} packs but one step needs data.micro_num {micro_num} x "
                f"data-parallel size {dp_size} = {micro_num * dp_size}"
                + (f" after the rampup's {reserve}" if reserve else "")
                + "; add data or shrink the batch"
            )
        self.per_rank = (reserve + full * micro_num * dp_size) // dp_size
        self.first_epoch_steps = len(self.ramp_sizes) + full
        self.steps_per_epoch = self.per_rank // micro_num  # every epoch after the first
        self._ramp_offsets = np.concatenate([[0], np.cumsum(self.ramp_sizes)]).astype(int)
        self._rng = np.random.RandomState(seed)
        self._epochs: list[np.ndarray] = []
        self._lock = threading.Lock()  # grain reads steps from several threads; the RNG must advance once per epoch

    def _ramp_steps(self) -> int:
        if self.ramp is None:
            return 0
        start, incr, every = self.ramp
        return -(-(self.micro_num - start) // incr) * every  # steps before micro_num_at reaches micro_num

    def micro_num_at(self, step: int) -> int:
        """Micro-batches at ``step``: ``min(start + (step // every) * incr, micro_num)`` under a rampup (D-11)."""
        if self.ramp is None:
            return self.micro_num
        start, incr, every = self.ramp
        return min(start + (step // every) * incr, self.micro_num)

    def _epoch(self, e: int) -> np.ndarray:
        with self._lock:
            while len(self._epochs) <= e:  # epochs are drawn in order from one continuing RNG, as InternEvo does
                order = np.arange(self.num_packs)
                self._rng.shuffle(order)
                # Row i holds the i-th pack of every rank's list order[r::dp].
                self._epochs.append(order[: self.per_rank * self.dp_size].reshape(self.per_rank, self.dp_size))
            return self._epochs[e]

    def packs(self, step: int) -> np.ndarray:
        """[micro_num_at(step), dp] pack indices of one step."""
        size = self.micro_num_at(step)
        if step < self.first_epoch_steps:
            epoch = 0
            ramp = len(self.ramp_sizes)
            at = self._ramp_offsets[step] if step < ramp else self._ramp_offsets[-1] + (step - ramp) * size
        else:
            epoch, s = divmod(step - self.first_epoch_steps, self.steps_per_epoch)
            epoch, at = epoch + 1, s * size
        return self._epoch(epoch)[at : at + size]


def parse_rampup(spec: str, micro_num: int) -> tuple[int, int, int] | None:
    """``data.rampup_batch_size`` ``"start incr every"`` -> (start, incr, every), or None when empty."""
    if not spec:
        return None
    parts = spec.split()
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"data.rampup_batch_size={spec!r}: expected 'start incr every', three positive integers")
    start, incr, every = map(int, parts)
    if start > micro_num:
        raise ConfigError(f"data.rampup_batch_size={spec!r}: start {start} exceeds data.micro_num {micro_num}")
    return start, incr, every


def batch_stats(segment_ids: np.ndarray) -> dict[str, int]:
    """InternEvo's per-step packing stats over one rank's micro-batches ``[micro_num, P]`` (log line §2)."""
    per_micro = segment_ids.max(axis=-1)
    lengths = [np.bincount(row)[1:] for row in segment_ids]
    return dict(
        num_samples_in_batch=int(per_micro.sum()),
        largest_length=int(max(length.max() for length in lengths)),
        largest_batch=int(per_micro.max()),
        smallest_batch=int(per_micro.min()),
    )


class StepSource:
    """grain random-access source: item s is this process's batch for step s."""

    def __init__(self, packs: PackedDataset | ConcatPacks, schedule: BatchSchedule, rows: range, num_steps: int):
        self.packs, self.schedule, self.rows, self.num_steps = packs, schedule, rows, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> dict[str, Any]:
        index = self.schedule.packs(step)[:, self.rows.start : self.rows.stop]  # [micro_num, local rows]
        items = [[self.packs[int(i)] for i in row] for row in index]
        batch = {f: np.stack([np.stack([it[f] for it in row]) for row in items]) for f in FIELDS}
        stats = batch_stats(batch["segment_ids"][:, 0]) if self.rows.start == 0 else {}
        return dict(batch=batch, stats=stats, step=step)


def build_train_loader(
    data: ml_collections.ConfigDict, dp_size: int, rows: range | None = None, vocab_size: int | None = None
) -> tuple[Any, list[str]]:
    """The training source for ``data`` (a ``StepSource``, or for type hf/streaming a ``hf.StreamSource``) and the
    dataset type names.

    ``data.train_folder`` None means InternEvo's dummy data (D-01); otherwise every ``.bin`` under it is packed on
    its own (D-05/D-06/D-07) and the packs are concatenated in walk order, as InternEvo's ``ConcatDataset`` does.
    ``vocab_size`` (the model's) bounds the token ids read from files.
    """
    if data.type in ("hf", "streaming"):  # raw text tokenized on the fly: an iterator, not random access
        from internevo_jax.data import hf

        return hf.build_train_loader(data, dp_size, rows, vocab_size)
    modes = dict(pack_sample_into_one=data.pack_sample_into_one, use_packed_dataset=data.use_packed_dataset)
    if data.train_folder is None:
        samples = DummyDataset(data.num_dummy_samples, data.seq_len, data.fixed_random_dataset_seqlen)
        packs = PackedDataset(samples, data.seq_len, data.micro_bsz, **modes)
        types = list(DATASET_TYPES)
    else:
        min_length_dict = None if data.min_length_dict is None else dict(data.min_length_dict)
        types, files = open_folder(data.train_folder, data.min_length, min_length_dict, vocab_size)
        # InternEvo skips files that min_length emptied (it logs them); the packs of the rest run in walk order.
        packs = ConcatPacks([PackedDataset(f, data.seq_len, data.micro_bsz, **modes) for f in files if len(f)])
        logging.getLogger("internevo_jax").info(
            "data.train_folder %s: %d .bin files, %d packs, %d samples dropped as shorter than data.min_length",
            data.train_folder,
            len(files),
            len(packs),
            sum(f.num_rows - len(f) for f in files),
        )
        if len(packs) == 0:
            kept = sum(len(f) for f in files)
            tokens = sum(int(f.lengths.sum()) for f in files)
            raise DataError(
                f"data.train_folder {data.train_folder}: {len(files)} .bin files hold {kept} samples of >= "
                f"data.min_length {data.min_length} tokens ({tokens} tokens), which make no pack of "
                f"data.seq_len x data.micro_bsz = {data.packed_length} tokens within any one file"
            )
    schedule = BatchSchedule(len(packs), data.micro_num, dp_size, data.seed, data.rampup_batch_size)
    rows = range(dp_size) if rows is None else rows
    return StepSource(packs, schedule, rows, data.total_steps), types


def iterate(source: Any, num_threads: int, state: dict | None = None) -> Iterator[dict[str, Any]]:
    """A prefetching iterator over ``source``; ``state`` (from ``get_state()``) resumes it exactly.

    A ``StepSource`` goes through grain; a streaming source (``data/hf.py``) brings its own iterator.
    """
    if not isinstance(source, StepSource):
        return source.iterator(num_threads, state)
    threads = max(1, num_threads)
    ds = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it
