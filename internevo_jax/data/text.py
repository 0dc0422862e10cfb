"""Raw text for streaming data (D-15): examples from local files or a Hugging Face dataset, and the tokenizers.

A local folder is read as ``datasets.load_dataset(folder, data_dir=subset_name, split="train")`` reads one: files of
``.jsonl`` / ``.json`` (also ``.gz``) / ``.parquet`` / ``.arrow`` under ``folder/subset_name`` (symlinks followed,
hidden names skipped) in sorted path-string order, and where folder names, else file names, mark splits (``train``,
``test``, ``valid``, ...) only the train ones. JSON is read here, ``.parquet`` / ``.arrow`` with pyarrow. Anything
else is a Hugging Face Hub dataset name for ``datasets.load_dataset(..., streaming=True)``. Examples are numbered
across files; data-parallel rank r reads examples ``r::dp`` (``split_dataset_by_node`` for a Hub dataset, which hands
out whole files instead when dp divides their count). The text is the ``data.content_name`` field of a record, or the
record itself if it is a string.

``data.tokenizer_path`` is a SentencePiece ``.model`` file (or a folder holding only ``tokenizer.model``), giving
``[bos] + ids + [eos]`` as ``tools/tokenizer.py`` writes, or a tokenizer folder / Hub name for
``transformers.AutoTokenizer`` (its own BOS/EOS, as InternEvo loads it).
Both truncate to ``seq_len`` as ``truncation=True`` with ``model_max_length=seq_len`` does, special tokens kept.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from internevo_jax.config import local_path
from internevo_jax.convert.hf_tokenizer import is_sentencepiece, sentencepiece_file
from internevo_jax.data.tokenized import DataError

BUFFER_SIZE = 1024  # texts per tokenizer call (InternEvo v0.5), rows per Arrow batch
FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TRAIN_WORDS = {"train", "training"}  # datasets' split keywords in file and folder names
OTHER_SPLIT_WORDS = {"test", "testing", "eval", "evaluation", "validation", "valid", "dev", "val"}
EXTRA = "(or pip install 'internevo_jax[hf]')"


def is_local(path: str) -> bool:
    """Whether ``path`` means a local file or folder: it exists, or it cannot be a Hub id ``name`` / ``org/name``."""
    if path.startswith("local:") or Path(local_path(path)).exists():
        return True
    local_suffix = Path(path).suffix in (*FORMATS, ".gz", ".model")
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or local_suffix


def _format(path: Path) -> str | None:
    """jsonl | json | parquet | arrow from the file name (json and jsonl may be .gz); None for other files."""
    gz = path.suffix == ".gz"
    kind = FORMATS.get(Path(path.stem).suffix if gz else path.suffix)
    return None if gz and kind not in ("json", "jsonl") else kind


def find_data_files(root: Path, subset: str | None) -> list[Path]:
    """The data files of a local folder or file, in ``datasets``' order, keeping the train split if names mark one."""
    base = root / subset if subset else root
    if root.is_file():
        if subset:
            raise DataError(f"data.subset_name {subset!r} names a subfolder, but data.train_folder {root} is a file")
        return [root] if _format(root) else []
    if not base.is_dir():
        raise DataError(f"data.train_folder {root}: no subfolder {subset!r} (data.subset_name)")
    files, seen = [], set()
    for folder, subfolders, names in os.walk(base, followlinks=True):  # symlinked folders count, as for .bin data
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle or a second link to the same folder
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__"))]  # datasets skips hidden ones
        files += [Path(folder, n) for n in names if not n.startswith((".", "__")) and _format(Path(n))]
    files.sort(key=lambda p: p.as_posix())  # datasets' order: sorted path strings

    # datasets' split="train": split keywords in folder names first, then in file names, else every file
    for words in (lambda p: _words(p.relative_to(base).parts[:-1]), lambda p: _words([p.name])):
        if any(words(p) & (TRAIN_WORDS | OTHER_SPLIT_WORDS) for p in files):
            train = [p for p in files if words(p) & TRAIN_WORDS]
            if not train:
                named = ", ".join(str(p.relative_to(base)) for p in files[:3])
                raise DataError(
                    f"data.train_folder {base}: names mark splits ({named}, ...) but none is the train split; name "
                    "the training files train*.jsonl (or put them in train/), as datasets.load_dataset expects"
                )
            return train
    return files


def _words(parts: Iterator[str] | list[str]) -> set[str]:
    return {w for part in parts for w in re.split(r"[-._ 0-9]+", part) if w}


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path) if path.suffix == ".gz" else open(path, "rb")


def _jsonl(path: Path, lines: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if line.strip():  # blank lines are no examples (pyarrow's JSON reader skips them too)
            yield f"{path}, line {number}", line  # bytes: parsed only by the rank that reads it


def _column(path: Path, kind: str, column: str) -> Iterator[list]:
    """The values of ``column`` of a .parquet or .arrow file, a batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading .{kind} files needs pyarrow: pip install pyarrow {EXTRA}") from err
    if kind == "parquet":
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        batches = lambda: file.iter_batches(batch_size=BUFFER_SIZE, columns=[column])  # noqa: E731
    else:
        try:  # datasets writes Arrow IPC streams; Arrow IPC files are read too
            stream = pa.ipc.open_stream(pa.memory_map(str(path)))
            names, batches = stream.schema.names, lambda: stream
        except pa.ArrowInvalid:
            file = pa.ipc.open_file(pa.memory_map(str(path)))
            names = file.schema.names
            batches = lambda: (file.get_batch(i) for i in range(file.num_record_batches))  # noqa: E731
    if column not in names:
        raise DataError(
            f"{path}: no column {column!r} (columns: {names}); set data.content_name to the column that holds the text"
        )
    for batch in batches():
        yield batch.column(batch.schema.get_field_index(column)).to_pylist()


class LocalCorpus:
    """The examples of local data files, numbered across files in order; rank r of dp reads examples r::dp."""

    def __init__(self, root: Path, subset: str | None, content_name: str):
        self.root, self.content_name = root, content_name
        if not root.exists():
            raise DataError(f"data.train_folder {root}: no such file or folder")
        self.files = find_data_files(root, subset)
        where = f"{root}/{subset}" if subset else str(root)
        if not self.files:
            raise DataError(
                f"data.train_folder {where} has no .jsonl, .json, .parquet or .arrow files (.gz for json); "
                "point it at the folder or file that holds the training text"
            )
        self._json: tuple[Path, list] | None = None  # the last .json parsed: the ranks of a process read in step
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.root} ({len(self.files)} file{'s' * (len(self.files) != 1)})"

    def examples(self, rank: int, dp: int, start: int) -> Generator[tuple[int, str]]:
        """(index in rank's slice, text) from index ``start`` of one pass over the data."""
        n = 0  # example number across all files
        for path in self.files:
            for where, raw in self._records(path):
                if n % dp == rank and n // dp >= start:
                    yield n // dp, _text(raw, self.content_name, where)
                n += 1

    def _records(self, path: Path) -> Iterator[tuple[str, Any]]:
        kind = _format(path)
        assert kind is not None, path  # self.files holds only the files _format names
        if kind == "jsonl":
            with _open_bytes(path) as f:
                yield from _jsonl(path, f)
        elif kind == "json":
            records = self._json_records(path)
            if isinstance(records, bytes):  # JSON lines in a .json file, as datasets accepts
                yield from _jsonl(path, iter(records.splitlines()))
            else:
                yield from ((f"{path}, record {i}", r) for i, r in enumerate(records))
        else:
            row = 0
            for values in _column(path, kind, self.content_name):
                for value in values:
                    yield f"{path}, row {row}", {self.content_name: value}
                    row += 1

    def _json_records(self, path: Path) -> list | bytes:
        """A .json file's records (a list, or one record), or its bytes if it holds JSON lines."""
        with self._lock:
            if self._json is not None and self._json[0] == path:
                return self._json[1]
            with _open_bytes(path) as f:
                text = f.read()
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":
                    raise DataError(f"{path}: not valid JSON ({err})") from err
                value = text
            if isinstance(value, dict):
                value = [value]
            elif not isinstance(value, list | bytes):
                raise DataError(
                    f"{path}: a .json file holds a list of records or JSON lines, got {type(value).__name__}"
                )
            self._json = (path, value)
            return value


def _text(raw: Any, field: str, where: str) -> str:
    """The text of one record: its ``field``, or the record itself if it is a string; bytes are a JSON line."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not a JSON record ({err})") from err
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, dict) or field not in raw:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(
            f"{where}: no {field!r} field (the record has {keys}); set data.content_name to the field with the text"
        )
    if not isinstance(raw[field], str):
        raise DataError(f"{where}: field {field!r} holds {type(raw[field]).__name__}, not text")
    return raw[field]


class HubCorpus:
    """A Hugging Face Hub dataset, streamed as InternEvo does; rank r reads ``split_dataset_by_node(rank=r)``."""

    def __init__(self, name: str, subset: str | None, content_name: str):
        self.name, self.content_name = name, content_name
        what = f"data.train_folder {name!r} is not a local file or folder, so it is read as a Hugging Face Hub dataset"
        try:
            import datasets
            from datasets.distributed import split_dataset_by_node
        except ImportError as err:
            raise DataError(f"{what}, which needs the datasets package: pip install datasets {EXTRA}") from err
        try:
            self.dataset = datasets.load_dataset(name, data_dir=subset, split="train", streaming=True)
        except Exception as err:
            raise DataError(f"{what}; datasets.load_dataset failed: {type(err).__name__}: {err}") from err
        self._split = split_dataset_by_node

    def describe(self) -> str:
        return f"Hugging Face dataset {self.name}"

    def examples(self, rank: int, dp: int, start: int) -> Generator[tuple[int, str]]:
        ds = self._split(self.dataset, rank=rank, world_size=dp)
        for i, record in itertools.islice(enumerate(ds), start, None):
            yield i, _text(record, self.content_name, f"{self.name}, example {i} of rank {rank}'s slice")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Texts -> token ids of at most ``seq_len``: a SentencePiece ``.model`` file or a ``transformers`` tokenizer."""

    def __init__(self, path: str, seq_len: int, num_threads: int = 1):
        self.path, self.seq_len, self.num_threads = local_path(path), seq_len, max(1, num_threads)
        # A folder holding only tokenizer.model (InternEvo's and Meta's model folders) is the SentencePiece model:
        # AutoTokenizer would guess a tokenizer class for it and encode other ids, without BOS/EOS.
        if is_local(path) and is_sentencepiece(self.path):
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_file(self.path)))
            except Exception as err:
                raise DataError(
                    f"data.tokenizer_path {self.path} is not a SentencePiece model ({err}); pass a .model file or "
                    "a Hugging Face tokenizer folder"
                ) from err
            self._sp: sentencepiece.SentencePieceProcessor | None = sp
            self.vocab_size = sp.vocab_size()
            return
        self._sp = None
        if is_local(path) and not Path(self.path).is_dir():
            raise DataError(
                f"data.tokenizer_path {self.path}: no such file or folder; pass a SentencePiece .model file or a "
                "Hugging Face tokenizer folder"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise DataError(
                f"data.tokenizer_path {self.path}: a tokenizer folder or Hub name needs transformers; pip install "
                "transformers, or pass a SentencePiece .model file"
            ) from err
        try:  # InternEvo loads it so, remote code included
            self._hf = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)
        except Exception as err:
            raise DataError(
                f"data.tokenizer_path {self.path}: transformers.AutoTokenizer could not load it "
                f"({type(err).__name__}: {err}); pass a SentencePiece .model file or a tokenizer folder"
            ) from err
        self._hf.model_max_length = seq_len
        self.vocab_size = len(self._hf)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._sp is None:
            ids = self._hf(texts, truncation=True)["input_ids"]
            return [np.asarray(x[: self.seq_len], np.int64) for x in ids]
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        head, tail = [bos] if bos >= 0 else [], [eos] if eos >= 0 else []
        room = max(0, self.seq_len - len(head) - len(tail))  # truncation keeps the special tokens, as HF's does
        ids = self._sp.encode(texts, num_threads=self.num_threads)
        return [np.asarray((head + x[:room] + tail)[: self.seq_len], np.int64) for x in ids]
