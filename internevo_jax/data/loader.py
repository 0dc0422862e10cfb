"""The training loader: InternEvo's ``StaticBatchSampler`` order (D-10, D-11) as a resumable grain pipeline.

Without a rampup, step ``s`` of data-parallel rank ``r`` reads packs ``order[r::dp][s' * micro_num:][:micro_num]``
(``s'`` the step within its epoch) of the current epoch's shuffle (``RandomState(data.seed)``, reshuffled with the
continuing RNG at each epoch wrap, D-14); ``BatchSchedule`` has the rampup's rules. Because a batch is a pure
function of the step, the iterator state is just the next step, and a resumed run sees exactly the batches an
uninterrupted run would have seen."""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from jax.sharding import Mesh

from internevo_jax import mesh as mesh_lib
from internevo_jax.config import ConfigError, parse_rampup
from internevo_jax.data import validation
from internevo_jax.data.dummy import DATASET_TYPES, DummyDataset
from internevo_jax.data.packing import FIELDS, ConcatPacks, PackedDataset, batch_stats
from internevo_jax.data.tokenized import DataError, open_folder


class BatchSchedule:
    """Which packs each data-parallel rank reads at each step: InternEvo's ``StaticBatchSampler`` (D-10/D-11).

    Every epoch shuffles all N packs with one continuing ``RandomState(data.seed)`` and keeps the first ``L * dp``;
    rank r reads its list ``order[r::dp]`` (L packs) front to back, ``micro_num_at(step)`` packs per step, and a step
    that meets the end of the list takes what is left (a short batch) before the next epoch starts. As in InternEvo,
    the rampup sizes ``min(start + (step // every) * incr, micro_num)`` count steps from the start of the run, and
    ``L`` depends on where the epoch starts: an epoch that starts within InternEvo's ``floor((micro_num - start) /
    incr) * every`` ramp steps (the first one) sets aside the R packs of those steps and keeps ``R + (N - R*dp) //
    (micro_num*dp) * micro_num``; every other epoch keeps ``N // (micro_num*dp) * micro_num``. When ``incr`` does
    not divide ``micro_num - start``, the ramp's last, partial increment is not set aside and the epoch it falls in
    ends on a short batch, as InternEvo's does (the trainer compiles one program per size, as for the ramp).

    A batch is a pure function of the step: the epoch layout does not depend on the shuffles, so it is computed up
    front; the shuffles are drawn in order (the RNG state before each one is kept), so a resumed run reads at every
    step exactly what an uninterrupted run reads.
    """

    def __init__(self, num_packs: int, micro_num: int, dp_size: int, seed: int, rampup: str = ""):
        self.num_packs, self.micro_num, self.dp_size = num_packs, micro_num, dp_size
        self.ramp = parse_rampup(rampup, micro_num)
        start, incr, every = self.ramp or (micro_num, micro_num, 1)
        reserved_steps = (micro_num - start) // incr * every  # InternEvo's ramp_steps * incre_every (floor)
        self.ramp_steps = -(-(micro_num - start) // incr) * every  # the first full-size step
        reserve = sum(self.micro_num_at(s) for s in range(reserved_steps))  # packs per rank set aside
        chunk = micro_num * dp_size
        if reserve * dp_size > num_packs or num_packs < chunk:
            raise ConfigError(
                f"the dataset has {num_packs} packs but one step needs data.micro_num {micro_num} x "
                f"data-parallel size {dp_size} = {chunk}"
                + (f" and the rampup's first {reserved_steps} steps {reserve * dp_size}" if reserve else "")
                + "; add data or shrink the batch"
            )
        self.epoch_length = num_packs // chunk * micro_num  # packs per rank of an epoch after the ramp
        self.steps_per_epoch = self.epoch_length // micro_num
        # The epochs that start before the first full-size step: (first step, packs per rank, offsets in the
        # rank's list of its steps before the first full-size step, and of the step after them). The rest of such an
        # epoch is full-size steps and, at its end, a short one.
        self._ramp_epochs: list[tuple[int, int, np.ndarray]] = []
        step = 0
        while step < self.ramp_steps:
            length = self.epoch_length
            if step < reserved_steps:
                length = reserve + (num_packs - reserve * dp_size) // chunk * micro_num
            offsets, s = [0], step
            while offsets[-1] < length and s < self.ramp_steps:
                offsets.append(min(offsets[-1] + self.micro_num_at(s), length))
                s += 1
            self._ramp_epochs.append((step, length, np.asarray(offsets)))
            step = s + -(-(length - offsets[-1]) // micro_num)
        self._ramp_starts = [e[0] for e in self._ramp_epochs]
        self.regular_start = step  # every epoch from here on: steps_per_epoch full-size steps
        self._rng = np.random.RandomState(seed)
        self._rng_states: list[Any] = []  # the RNG state before epoch e's shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # grain reads steps from several threads; the RNG must advance once per epoch

    def micro_num_at(self, step: int) -> int:
        """The rampup's size at ``step``: ``min(start + (step // every) * incr, micro_num)`` (D-11); a step at the
        end of an epoch may take fewer (``len(packs(step))``)."""
        if self.ramp is None:
            return self.micro_num
        start, incr, every = self.ramp
        return min(start + (step // every) * incr, self.micro_num)

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, offset in each rank's list, number of packs) of ``step``."""
        if step < self.regular_start:
            e = bisect.bisect_right(self._ramp_starts, step) - 1
            first, length, offsets = self._ramp_epochs[e]
            k = step - first
            if k + 1 < len(offsets):
                return e, int(offsets[k]), int(offsets[k + 1] - offsets[k])
            at = int(offsets[-1]) + (k + 1 - len(offsets)) * self.micro_num
            return e, at, min(self.micro_num, length - at)
        e, s = divmod(step - self.regular_start, self.steps_per_epoch)
        return len(self._ramp_epochs) + e, s * self.micro_num, self.micro_num

    def _length(self, epoch: int) -> int:
        return self._ramp_epochs[epoch][1] if epoch < len(self._ramp_epochs) else self.epoch_length

    def _epoch(self, e: int) -> np.ndarray:
        """[L, dp] pack indices of epoch ``e``: row i holds the i-th pack of every rank's list ``order[r::dp]``."""
        with self._lock:
            if e not in self._cache:
                order = None
                while len(self._rng_states) <= e:  # epochs are drawn in order from one continuing RNG, as InternEvo's
                    self._rng_states.append(self._rng.get_state())
                    order = np.arange(self.num_packs)
                    self._rng.shuffle(order)
                if order is None:  # an epoch drawn before: shuffle again from the state it was drawn with
                    rng = np.random.RandomState()
                    rng.set_state(self._rng_states[e])
                    order = np.arange(self.num_packs)
                    rng.shuffle(order)
                if len(self._cache) >= 2:  # grain reads steps close together: one epoch, at a wrap two
                    self._cache.pop(min(self._cache))
                length = self._length(e)
                self._cache[e] = order[: length * self.dp_size].reshape(length, self.dp_size)
            return self._cache[e]

    def packs(self, step: int) -> np.ndarray:
        """[size, dp] pack indices of one step (size: ``micro_num_at(step)``, or what is left of the epoch)."""
        epoch, at, size = self.locate(step)
        return self._epoch(epoch)[at : at + size]


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
        top = samples.max_token_id()
        if vocab_size is not None and top >= vocab_size:  # known from the config: refused before any compile
            raise ConfigError(
                f"dummy data (data.train_folder=None) holds token ids up to {top} (num_dummy_samples "
                f"{data.num_dummy_samples}, seq_len {data.seq_len}, fixed_random_dataset_seqlen "
                f"{data.fixed_random_dataset_seqlen}), but model.vocab_size is {vocab_size}: set model.vocab_size >= "
                f"{top + 1} or point data.train_folder at tokenized data"
            )
        packs: PackedDataset | ConcatPacks = PackedDataset(samples, data.seq_len, data.micro_bsz, **modes)
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


# The loaders of a run on a mesh: this process's data-parallel rows (the Trainer and InternEvo's builders).


def train_loader(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, list[str]]:
    """This process's training data on ``mesh`` and the dataset type names (``build_train_loader``)."""
    dp, rows = mesh_lib.data_parallel_rows(mesh)
    return build_train_loader(config.data, dp, rows, config.model.vocab_size)


def valid_loaders(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, validation.ValidSet]:
    """The validation sets of ``data.valid_folder`` by name; a set too small for the data-parallel size of ``mesh`` is
    left out with a warning naming it and why."""
    dp, _ = mesh_lib.data_parallel_rows(mesh)
    log, sets = logging.getLogger("internevo_jax"), {}
    for vs in validation.build_valid_sets(config.data, dp, config.model.vocab_size):
        if vs.skip_reason is not None:
            log.warning(vs.skip_reason)
        else:
            log.info("validation set %s: %d samples, %d batches", vs.name, vs.num_samples, vs.num_batches)
            sets[vs.name] = vs
    return sets


def check_rows(name: str, got: range, want: range, dp: int) -> None:
    """Refuses a loader built for other data-parallel rows than the trainer's mesh gives this process."""
    if got != want:
        raise ConfigError(
            f"{name} feeds data-parallel rows {got.start}..{got.stop - 1}, but this trainer's mesh has data-parallel "
            f"size {dp} and this process feeds rows {want.start}..{want.stop - 1}: build it with "
            "build_train_loader_with_data_type(config, trainer_mesh) / build_valid_loader_with_data_type"
        )
