"""InternEvo's streaming data (D-15, ``data.type="hf"`` / ``"streaming"``): raw text tokenized on the fly and packed.

``data.train_folder`` (a local folder or file of jsonl/json/parquet/arrow files, or a Hugging Face dataset name),
``data.subset_name``, ``data.content_name`` and ``data.tokenizer_path`` are read as ``text.py`` says: data-parallel
rank r gets examples ``r::dp``, tokenized in buffers of 1024, truncated to ``seq_len``, empty ones dropped. Packs of
``P = micro_bsz * seq_len`` tokens, labels ``next token if > 0 else -100`` within each sample:

- default (``StreamingDatasetPackSampleWithPad``): whole samples are appended until the next would overflow P; the
  rest is padded with token 0 / label -100 as a segment of its own (positions restart at 0 in every segment).
- ``pack_sample_into_one`` (``StreamingDatasetPackSampleIntoOneWithCut``): the token stream is cut into packs, a
  sample cut at a pack edge continues the next pack; fixed ``seq_len`` windows, labels -100 at every fragment end.
  (InternEvo's code restarts the next pack with the *whole* cut sample, training its first part twice, against its
  own docstring example; we follow the docstring.)
- ``use_packed_dataset=False``: each of the ``micro_bsz`` rows is one sample, right-padded to ``seq_len``.

A step is each rank's next ``micro_num`` packs. A rank's stream never ends: its last partial pack is padded and the
stream restarts (the next epoch). Type ids are 0 and the dataset type is ``en``, as in InternEvo.

Resume: a pack begins at a position ``(epoch, example, token offset)`` of the rank's example slice, and packing from
there depends on nothing before it, so the iterator state is the next step plus each rank's position; a restore
re-opens the stream, skips that many raw examples (no tokenizing) and continues exactly. A state without this
process's ranks (multi-host: the checkpoint keeps process 0's) or from another batch layout is resumed as
InternEvo's "simple resume" does: the stream is re-read and ``step * micro_num`` packs per rank are skipped.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from internevo_jax.config import ConfigError, local_path
from internevo_jax.data.packing import FIELDS, IGNORE_INDEX, batch_stats
from internevo_jax.data.text import BUFFER_SIZE, HubCorpus, LocalCorpus, Tokenizer, is_local
from internevo_jax.data.tokenized import DataError

DATASET_TYPES = ("en",)  # what InternEvo reports for hf/streaming data; every token has type 0
PAD_ID = 0  # InternEvo's model.pad_token_id default
log = logging.getLogger("internevo_jax")

Sample = tuple[int, np.ndarray]  # (example index in the rank's slice, token ids)
Position = tuple[int, int, int]  # (epoch, example index in the rank's slice, token offset into it)


# ---------------------------------------------------------------------------------------------------------------------
# Packing one rank's stream
# ---------------------------------------------------------------------------------------------------------------------


def _pack_with_pad(samples: list[np.ndarray], p: int) -> dict[str, np.ndarray]:
    tokens, labels = np.full(p, PAD_ID, np.int64), np.full(p, IGNORE_INDEX, np.int64)
    positions, segments = np.zeros(p, np.int32), np.zeros(p, np.int32)
    at = 0
    for k, s in enumerate(samples, start=1):
        n = len(s)
        tokens[at : at + n], labels[at : at + n - 1] = s, s[1:]
        positions[at : at + n], segments[at : at + n] = np.arange(n), k
        at += n
    if at < p:  # the padding is one more segment (InternEvo appends P to cu_seqlens)
        positions[at:], segments[at:] = np.arange(p - at), len(samples) + 1
    return _finish(tokens, labels, positions, segments)


def _pack_into_one(fragments: list[np.ndarray], seq_len: int, micro_bsz: int) -> dict[str, np.ndarray]:
    p = seq_len * micro_bsz
    tokens, labels = np.full(p, PAD_ID, np.int64), np.full(p, IGNORE_INDEX, np.int64)
    at = 0
    for f in fragments:  # every fragment, cut at a pack edge or not, ends with -100
        tokens[at : at + len(f)], labels[at : at + len(f) - 1] = f, f[1:]
        at += len(f)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), micro_bsz)
    segments = np.repeat(np.arange(1, micro_bsz + 1, dtype=np.int32), seq_len)
    return _finish(tokens, labels, positions, segments)


def _pack_unpacked(rows: list[np.ndarray], seq_len: int, micro_bsz: int) -> dict[str, np.ndarray]:
    p = seq_len * micro_bsz
    tokens, labels = np.full(p, PAD_ID, np.int64), np.full(p, IGNORE_INDEX, np.int64)
    positions, segments = np.zeros(p, np.int32), np.zeros(p, np.int32)
    segment = 0
    for j in range(micro_bsz):
        at, s = j * seq_len, rows[j] if j < len(rows) else np.zeros(0, np.int64)
        n = len(s)
        if n:
            segment += 1
            tokens[at : at + n], labels[at : at + n - 1] = s, s[1:]
            positions[at : at + n], segments[at : at + n] = np.arange(n), segment
        if n < seq_len:
            segment += 1
            positions[at + n : at + seq_len], segments[at + n : at + seq_len] = np.arange(seq_len - n), segment
    return _finish(tokens, labels, positions, segments)


def _finish(tokens: np.ndarray, labels: np.ndarray, positions: np.ndarray, segments: np.ndarray) -> dict:
    return dict(
        tokens=tokens.astype(np.int32),
        labels=np.where(labels > 0, labels, IGNORE_INDEX).astype(np.int32),  # InternEvo ignores label id 0 too
        positions=positions,
        segment_ids=segments,
        type_ids=np.zeros(len(tokens), np.int32),
    )


class RankStream:
    """The packs of one data-parallel rank, from ``position`` on; ``position`` is where the next pack begins."""

    def __init__(self, source: StreamSource, rank: int, position: Position):
        self.source, self.rank = source, rank
        self.epoch, start, offset = (int(x) for x in position)
        self._pending: tuple[int, np.ndarray, int] | None = None  # a sample (index, tokens, offset) left for later
        self._open(start)
        if offset:
            sample = self._pull()
            if sample is None or sample[0] != start or offset >= len(sample[1]):
                raise DataError(
                    f"{source.corpus.describe()}: the data state resumes inside example {start} of rank {rank}'s "
                    f"slice at token {offset}, which the data no longer has (did the data or tokenizer change?)"
                )
            self._pending = (sample[0], sample[1], offset)

    def _open(self, start: int) -> None:
        self._samples = self.source.samples(self.rank, start)
        self._next, self._from_start, self._seen = start, start == 0, False

    def _pull(self) -> Sample | None:
        sample = next(self._samples, None)
        if sample is not None:
            self._next, self._seen = sample[0] + 1, True
        return sample

    def _take(self) -> tuple[int, np.ndarray, int] | None:
        """The next (index, tokens, offset) of this epoch; None at its end."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        sample = self._pull()
        return None if sample is None else (*sample, 0)

    def _wrap(self) -> None:
        if self._from_start and not self._seen:
            raise DataError(
                f"{self.source.corpus.describe()}: data-parallel rank {self.rank} of {self.source.dp} reads examples "
                f"{self.rank}, {self.rank + self.source.dp}, ... and none of them holds text that tokenizes to a "
                "token; add data or use fewer data-parallel ranks"
            )
        self.epoch += 1
        self._open(0)

    @property
    def position(self) -> Position:
        if self._pending is not None:
            return (self.epoch, self._pending[0], self._pending[2])
        return (self.epoch, self._next, 0)

    def next_pack(self) -> dict[str, np.ndarray]:
        src = self.source
        seq_len, micro_bsz, p = src.seq_len, src.micro_bsz, src.seq_len * src.micro_bsz
        parts: list[np.ndarray] = []
        used = 0
        while used < p:  # unpacked: one row of seq_len per sample
            sample = self._take()
            if sample is None:  # the end of this rank's slice: pad what there is, then start over
                self._wrap()
                if parts:
                    break
                continue
            index, tokens, offset = sample
            piece = tokens[offset:]
            if src.mode == "pad" and used + len(piece) > p:  # whole samples only: it starts the next pack
                self._pending = sample
                break
            if src.mode == "into_one" and used + len(piece) > p:
                self._pending = (index, tokens, offset + p - used)
                piece = piece[: p - used]
            parts.append(piece)
            used += seq_len if src.mode == "unpacked" else len(piece)
        if src.mode == "pad":
            return _pack_with_pad(parts, p)
        if src.mode == "into_one":
            return _pack_into_one(parts, seq_len, micro_bsz)
        return _pack_unpacked(parts, seq_len, micro_bsz)


# ---------------------------------------------------------------------------------------------------------------------
# The source and its resumable iterator
# ---------------------------------------------------------------------------------------------------------------------


class StreamSource:
    """This process's training batches from a text stream: ``rows`` are the data-parallel ranks it feeds."""

    def __init__(
        self,
        corpus: LocalCorpus | HubCorpus,
        tokenizer: Tokenizer,
        data: ml_collections.ConfigDict,
        dp_size: int,
        rows: range,
    ):
        self.corpus, self.tokenizer, self.dp, self.rows = corpus, tokenizer, dp_size, rows
        self.seq_len, self.micro_bsz, self.micro_num = data.seq_len, data.micro_bsz, data.micro_num
        self.mode = "into_one" if data.pack_sample_into_one else "pad" if data.use_packed_dataset else "unpacked"
        self.layout = [dp_size, self.micro_num, self.seq_len, self.micro_bsz, self.mode]

    def samples(self, rank: int, start: int) -> Iterator[Sample]:
        """Rank ``rank``'s non-empty tokenized samples from example ``start`` of one pass, tokenized in buffers."""
        examples = self.corpus.examples(rank, self.dp, start)
        while buffer := list(itertools.islice(examples, BUFFER_SIZE)):
            for (index, _), tokens in zip(buffer, self.tokenizer.encode([t for _, t in buffer]), strict=True):
                if len(tokens):
                    yield index, tokens

    def resume(self, state: dict | None) -> tuple[int, dict[int, Position], int]:
        """(next step, each row's position, packs each row skips first) for ``state`` from ``get_state()``."""
        fresh = {r: (0, 0, 0) for r in self.rows}
        if state is None:
            return 0, fresh, 0
        if state.get("kind") != "stream":
            raise ConfigError(
                f"the checkpoint's data state {sorted(state)} is not from a data.type='hf'/'streaming' run; "
                "resume it with the data.type it was saved with"
            )
        step, positions = int(state["step"]), state["positions"]
        if state["layout"] == self.layout and all(str(r) in positions for r in self.rows):
            return step, {r: tuple(positions[str(r)]) for r in self.rows}, 0
        log.warning(
            "data state: saved for layout %s and ranks %s, this run has %s and ranks %s; re-reading the stream and "
            "skipping %d packs per rank (InternEvo's simple resume)",
            state["layout"],
            sorted(positions, key=int),
            self.layout,
            list(self.rows),
            step * self.micro_num,
        )
        return step, fresh, step * self.micro_num

    def state(self, step: int, positions: dict[int, Position]) -> dict[str, Any]:
        """The iterator state before ``step`` (JSON: it goes into the checkpoint)."""
        return dict(
            kind="stream", step=step, layout=self.layout, positions={str(r): list(positions[r]) for r in self.rows}
        )

    def batch(self, streams: list[RankStream], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Step ``step``'s item (as ``StepSource`` gives it) and the iterator state after it."""
        packs = [[s.next_pack() for s in streams] for _ in range(self.micro_num)]  # each rank's next micro_num packs
        batch = {f: np.stack([np.stack([p[f] for p in row]) for row in packs]) for f in FIELDS}
        stats = batch_stats(batch["segment_ids"][:, 0]) if self.rows.start == 0 else {}
        state = self.state(step + 1, {s.rank: s.position for s in streams})
        return dict(batch=batch, stats=stats, step=step), state

    def iterator(self, num_threads: int, state: dict | None = None) -> StreamIterator:
        return StreamIterator(self, state, prefetch=max(2, num_threads))


class StreamIterator:
    """Batches in step order, built ahead by one thread; ``get_state()`` is the state after the last batch returned."""

    def __init__(self, source: StreamSource, state: dict | None, prefetch: int):
        self._stop = threading.Event()
        step, positions, skip = source.resume(state)
        self._state = source.state(step, positions) if state is None else state
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        # The thread holds the source and the queue, never this iterator, so dropping the iterator stops it.
        args = (source, positions, step, skip, self._queue, self._stop)
        threading.Thread(target=_produce, args=args, daemon=True, name="hf-data").start()

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        got = self._queue.get()
        if isinstance(got, BaseException):
            self._error = got
            raise got
        item, self._state = got
        return item

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._state))  # a copy, as the checkpoint's JSON will hold it

    def close(self) -> None:
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _produce(
    source: StreamSource,
    positions: dict[int, Position],
    step: int,
    skip: int,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Builds batches from ``step`` on into ``out`` until ``stop``; an error is handed over as the next item."""

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:  # opening streams skips examples and replaying tokenizes: both off the training thread
        streams = [RankStream(source, r, positions[r]) for r in source.rows]
        for stream in streams:
            for _ in range(skip):
                stream.next_pack()
        while put(source.batch(streams, step)):
            step += 1
    except BaseException as err:  # raised in the consumer by next()
        put(err)


def build_train_loader(
    data: ml_collections.ConfigDict, dp_size: int, rows: range | None = None, vocab_size: int | None = None
) -> tuple[StreamSource, list[str]]:
    """The streaming source for ``data`` (type hf/streaming) and its dataset types; fails fast on bad input."""
    if data.rampup_batch_size:
        raise ConfigError(
            f"data.rampup_batch_size={data.rampup_batch_size!r} is not supported with data.type={data.type!r} yet; "
            "drop it or use tokenized data"
        )
    tokenizer = Tokenizer(data.tokenizer_path, data.seq_len, data.num_worker)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"data.tokenizer_path {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}; use the model's tokenizer or a larger vocabulary"
        )
    if is_local(data.train_folder):
        corpus: LocalCorpus | HubCorpus = LocalCorpus(
            Path(local_path(data.train_folder)), data.subset_name, data.content_name
        )
    else:
        corpus = HubCorpus(data.train_folder, data.subset_name, data.content_name)
    source = StreamSource(corpus, tokenizer, data, dp_size, range(dp_size) if rows is None else rows)
    examples = corpus.examples(0, 1, 0)
    first = next(examples, None)  # reads and checks one record now, not after the compile
    examples.close()
    if first is None:
        raise DataError(f"data.train_folder {corpus.describe()} holds no examples (empty files?); add data")
    log.info(
        "data.train_folder %s: streamed, tokenized with %s, %s packs of %d tokens",
        corpus.describe(),
        tokenizer.path,
        source.mode,
        data.seq_len * data.micro_bsz,
    )
    return source, list(DATASET_TYPES)
