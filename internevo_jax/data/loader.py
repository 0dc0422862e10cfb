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
    """Which packs each data-parallel rank reads at each step (``StaticBatchSampler``, drop_last)."""

    def __init__(self, num_packs: int, micro_num: int, dp_size: int, seed: int):
        self.steps_per_epoch = num_packs // (micro_num * dp_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {num_packs} packs but one step needs data.micro_num {micro_num} x "
                f"data-parallel size {dp_size} = {micro_num * dp_size}; add data or shrink the batch"
            )
        self.num_packs, self.micro_num, self.dp_size = num_packs, micro_num, dp_size
        self._rng = np.random.RandomState(seed)
        self._epochs: list[np.ndarray] = []
        self._lock = threading.Lock()  # grain reads steps from several threads; the RNG must advance once per epoch

    def _epoch(self, e: int) -> np.ndarray:
        with self._lock:
            while len(self._epochs) <= e:  # epochs are drawn in order from one continuing RNG, as InternEvo does
                order = np.arange(self.num_packs)
                self._rng.shuffle(order)
                used = self.steps_per_epoch * self.micro_num * self.dp_size
                # order[r::dp] is rank r's list; consecutive micro_num chunks of it are its steps.
                self._epochs.append(order[:used].reshape(self.steps_per_epoch, self.micro_num, self.dp_size))
            return self._epochs[e]

    def packs(self, step: int) -> np.ndarray:
        """[micro_num, dp] pack indices of one step."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[s]


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
) -> tuple[StepSource, list[str]]:
    """The training source for ``data`` and the dataset type names.

    ``data.train_folder`` None means InternEvo's dummy data (D-01); otherwise every ``.bin`` under it is packed on
    its own (D-05/D-06/D-07) and the packs are concatenated in walk order, as InternEvo's ``ConcatDataset`` does.
    ``vocab_size`` (the model's) bounds the token ids read from files.
    """
    if data.rampup_batch_size:
        raise ConfigError("data.rampup_batch_size lands with issue #4; set it to ''")
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
    schedule = BatchSchedule(len(packs), data.micro_num, dp_size, data.seed)
    rows = range(dp_size) if rows is None else rows
    return StepSource(packs, schedule, rows, data.total_steps), types


def iterate(source: StepSource, num_threads: int, state: dict | None = None) -> Iterator[dict[str, Any]]:
    """A prefetching grain iterator over ``source``; ``state`` (from ``get_state()``) resumes it exactly."""
    threads = max(1, num_threads)
    ds = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    )
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it
