"""Tokenize raw text into InternEvo's ``.bin`` + ``.bin.meta`` training format (InternEvo's ``tools/tokenizer.py``).

    python tools/tokenizer.py --text_input_path raw.txt --bin_output_path train/cn/raw.bin \\
        [--tokenizer_path tools/tokenizer_internlm.model]

Inputs by extension: ``.txt`` one sample per non-empty line (stripped); ``.jsonl`` one JSON record per line and
``.json`` a list of records, the text taken from ``--text_key`` (default ``text``; a record that is a plain string is
the text). InternEvo's tool tokenized the whole JSON record, syntax included (its issue #103); we read the field.
Every sample becomes ``[bos] + ids + [eos]`` like InternEvo's (``InternLMTokenizer(add_bos_token=True,
add_eos_token=True)``). The ``.bin`` gets ``json.dumps({"tokens": ids}) + "\\n"`` per sample and the ``.bin.meta`` an
int64 ``np.save`` of ``[byte offset, token count]`` rows (InternEvo wrote int32, which overflows past 2 GiB).

Both files are written to temporary files in the output folder and renamed at the end, so an interrupted run leaves
no half-written dataset. An existing output is kept unless ``--overwrite`` is given (InternEvo appended to it).
"""

from __future__ import annotations

import argparse
import array
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece

from internevo_jax.data.tokenized import atomic_outputs

DEFAULT_MODEL = Path(__file__).resolve().parent / "tokenizer_internlm.model"  # where InternEvo hard-codes it
BATCH = 1024  # texts per SentencePiece call (it encodes a list in parallel)
PROGRESS_SECONDS = 5.0


def read_texts(path: Path, text_key: str) -> Iterator[tuple[str, int, int]]:
    """(text, position for error messages, input bytes consumed so far) for each sample of ``path``."""
    kind = path.suffix
    if kind == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {path}: not valid JSON ({err})") from err
        if not isinstance(records, list):
            raise SystemExit(f"error: {path}: a .json input must be a list of records, got {type(records).__name__}")
        size = path.stat().st_size
        for i, record in enumerate(records):
            yield _text(record, text_key, f"{path}, record {i}"), i, size * (i + 1) // len(records)
        return
    done = 0
    with open(path, "rb") as f:  # bytes, so progress can count them
        for number, raw in enumerate(f, start=1):
            done += len(raw)
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SystemExit(f"error: {where}: not UTF-8 ({err})") from err
            if not line.strip():
                continue
            if kind == ".txt":
                yield line.strip(), number, done
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {where}: not a JSON record ({err})") from err
            yield _text(record, text_key, where), number, done


def _text(record: object, key: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(key), str):
        return record[key]
    raise SystemExit(f"error: {where}: expected a string or a record with a string {key!r} field")


def _batches(items: Iterator[tuple[str, int, int]]) -> Iterator[tuple[list[str], int]]:
    texts, done = [], 0
    for text, _, done in items:
        texts.append(text)
        if len(texts) == BATCH:
            yield texts, done
            texts = []
    if texts:
        yield texts, done


def tokenize(args: argparse.Namespace) -> tuple[int, int]:
    """Writes ``args.bin_output_path`` and its ``.meta``; returns (samples, tokens)."""
    source, out = Path(args.text_input_path), Path(args.bin_output_path)
    meta_out = Path(f"{out}.meta")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer_path))
    head = [sp.bos_id()] if args.add_bos else []
    tail = [sp.eos_id()] if args.add_eos else []
    if -1 in head + tail:
        raise SystemExit(f"error: {args.tokenizer_path} defines no BOS/EOS id; pass --no-add_bos / --no-add_eos")

    out.parent.mkdir(parents=True, exist_ok=True)
    total = max(source.stat().st_size, 1)
    rows = array.array("q")  # flat [offset, count, offset, count, ...]; a list of tuples would not fit big inputs
    offset = num_tokens = 0
    last = time.time()
    with atomic_outputs(out, meta_out) as (f, f_meta):
        for texts, done in _batches(read_texts(source, args.text_key)):
            for ids in sp.encode(texts):
                line = (json.dumps({"tokens": head + ids + tail}) + "\n").encode("utf-8")
                f.write(line)
                count = len(head) + len(ids) + len(tail)
                rows.extend((offset, count))
                offset += len(line)
                num_tokens += count
            if time.time() - last > PROGRESS_SECONDS:
                last = time.time()
                done_pct = 100 * done / total
                print(
                    f"{len(rows) // 2:,} samples, {num_tokens:,} tokens, {done_pct:.1f}% of {source}",
                    file=sys.stderr,
                )
        np.save(f_meta, np.frombuffer(rows, dtype=np.int64).reshape(-1, 2))
    return len(rows) // 2, num_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI: InternEvo's two flags plus the tokenizer model, JSON field, BOS/EOS and overwrite switches."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_input_path", required=True, help="input: .txt (a sample per line), .json or .jsonl")
    parser.add_argument("--bin_output_path", required=True, help="output .bin (its .bin.meta is written next to it)")
    parser.add_argument(
        "--tokenizer_path", default=str(DEFAULT_MODEL), help="SentencePiece model file (default: %(default)s)"
    )
    parser.add_argument("--text_key", default="text", help="field holding the text in .json/.jsonl records")
    parser.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True, help="prepend BOS")
    parser.add_argument("--add_eos", action=argparse.BooleanOptionalAction, default=True, help="append EOS")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output .bin/.bin.meta")
    args = parser.parse_args(argv)
    source, out = Path(args.text_input_path), Path(args.bin_output_path)
    if not source.is_file():
        parser.error(f"--text_input_path {source} does not exist")
    if source.suffix not in (".txt", ".json", ".jsonl"):
        parser.error(f"--text_input_path {source}: the extension must be .txt, .json or .jsonl")
    if not Path(args.tokenizer_path).is_file():
        parser.error(f"--tokenizer_path {args.tokenizer_path} does not exist (a SentencePiece .model file)")
    if out.suffix != ".bin":
        parser.error(f"--bin_output_path {out} must end in .bin (the training loader reads only .bin files)")
    existing = [p for p in (out, Path(f"{out}.meta")) if p.exists()]
    if existing and not args.overwrite:
        parser.error(f"{', '.join(map(str, existing))} already exist; pass --overwrite to replace them")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    samples, tokens = tokenize(args)
    print(
        f"wrote {samples:,} samples ({tokens:,} tokens) to {args.bin_output_path} and {args.bin_output_path}.meta "
        f"in {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
