"""Tokenize Alpaca-style instruction data into InternEvo's SFT ``.bin`` + ``.bin.meta`` (InternEvo's alpaca tool).

    python tools/alpaca_tokenizer.py alpaca_data.json OUTPUT_DIR tokenizer.model [--split_ratio 0.1]

The input is a JSON list of ``{"instruction", "input", "output"}`` records (a ``.jsonl`` of them also works). Each
becomes one sample in InternEvo v0.3.4's chat layout, where negative ids are context the loss skips and positive
ids are targets:

    [bos] + neg(sp(user) + [eoh, nl]) + neg(sp("<|Bot|>:")) + sp(output) + [eoa, nl], cut to 2047, then + [eos]

with ``user = "<|User|>:" + instruction`` (``+ "\\n" + input`` when the input is not empty), so only the answer,
its end-of-answer marker and the final eos are trained. ``--eoh_id/--eoa_id/--nl_id`` default to InternEvo's ids
for its 103168-piece tokenizer; pass your tokenizer's own. Samples are split as InternEvo does:
``np.random.seed(0); np.random.choice(N, int(N * split_ratio))`` (with replacement) picks the validation samples,
written to ``OUTPUT_DIR/valid/en/dataset.bin`` and the rest to ``OUTPUT_DIR/train/en/dataset.bin``, each with an int64
``.bin.meta`` of ``[byte offset, token count]`` rows. Every file goes through a temporary name and a rename;
existing outputs are replaced, as InternEvo's tool replaces them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece

from internevo_jax.data.tokenized import atomic_outputs

EOH_ID, EOA_ID, NL_ID = 103167, 103166, 13  # InternEvo v0.3.4: <eoh>, <eoa> and "\n" of tokenizer_internlm.model
MAX_TOKENS = 2047  # before the eos, as InternEvo cuts


def read_records(path: Path) -> list[dict]:
    """The records of a JSON list (or JSON lines) file, each checked for its three string fields."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise SystemExit(f"error: {path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("instruction", "input", "output")):
            raise SystemExit(f'error: {path}, record {i}: needs string "instruction", "input" and "output" fields')
    return records


def tokenize(record: dict, sp: sentencepiece.SentencePieceProcessor, eoh: int, eoa: int, nl: int) -> list[int]:
    """One record's ids in InternEvo's alpaca layout; negative ids are not targets."""
    user = f"<|User|>:{record['instruction']}" + (f"\n{record['input']}" if record["input"] != "" else "")
    human = [-t for t in sp.encode(user) + [eoh, nl]]
    bot_prefix = [-t for t in sp.encode("<|Bot|>:")]
    ids = [sp.bos_id()] + human + bot_prefix + sp.encode(record["output"]) + [eoa, nl]
    return ids[:MAX_TOKENS] + [sp.eos_id()]


def valid_indices(n: int, split_ratio: float) -> set[int]:
    """InternEvo's validation pick: ``np.random.seed(0); np.random.choice(range(n), int(n * ratio))``, as a set."""
    return set(np.random.RandomState(0).choice(n, int(n * split_ratio)).tolist()) if n else set()


def write_split(folder: Path, samples: list[list[int]]) -> int:
    """Writes ``folder/dataset.bin`` and its int64 ``.bin.meta`` via temporary files; returns the token count."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [(json.dumps({"tokens": s}) + "\n").encode() for s in samples]
    meta = np.zeros((len(lines), 2), np.int64)
    meta[1:, 0] = np.cumsum([len(line) for line in lines[:-1]])
    meta[:, 1] = [len(s) for s in samples]
    index = io.BytesIO()
    np.save(index, meta)
    with atomic_outputs(folder / "dataset.bin", folder / "dataset.bin.meta") as (f, f_meta):
        f.write(b"".join(lines))
        f_meta.write(index.getvalue())
    return int(meta[:, 1].sum())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """InternEvo's CLI (three positionals and ``--split_ratio``) plus the special-token ids."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_path", help="Alpaca JSON list of {instruction, input, output} (or .jsonl)")
    parser.add_argument("output_path", help="output folder: train/en/dataset.bin and valid/en/dataset.bin go here")
    parser.add_argument("tokenizer_path", help="SentencePiece model file")
    parser.add_argument("--split_ratio", type=float, default=0.1, help="validation share (default %(default)s)")
    parser.add_argument("--eoh_id", type=int, default=EOH_ID, help="end-of-human id (default %(default)s)")
    parser.add_argument("--eoa_id", type=int, default=EOA_ID, help="end-of-answer id (default %(default)s)")
    parser.add_argument("--nl_id", type=int, default=NL_ID, help="newline id after eoh/eoa (default %(default)s)")
    args = parser.parse_args(argv)
    if not Path(args.dataset_path).is_file():
        parser.error(f"dataset_path {args.dataset_path} does not exist")
    if not Path(args.tokenizer_path).is_file():
        parser.error(f"tokenizer_path {args.tokenizer_path} does not exist (a SentencePiece .model file)")
    if not 0 <= args.split_ratio < 1:
        parser.error(f"--split_ratio must be in [0, 1), got {args.split_ratio}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_path)
    vocab = sp.get_piece_size()
    if -1 in (sp.bos_id(), sp.eos_id()):
        raise SystemExit(f"error: {args.tokenizer_path} defines no BOS/EOS id; the alpaca layout needs both")
    for name in ("eoh_id", "eoa_id", "nl_id"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name} must be > 0: its negative marks it as not a target")
        if getattr(args, name) >= vocab:  # a model may pad its vocabulary past the tokenizer's, so only warn
            print(f"warning: --{name} {getattr(args, name)} is outside the tokenizer's {vocab} pieces", file=sys.stderr)
    records = read_records(Path(args.dataset_path))
    samples = [tokenize(r, sp, args.eoh_id, args.eoa_id, args.nl_id) for r in records]
    valid = valid_indices(len(samples), args.split_ratio)
    out = Path(args.output_path)
    train_samples = [s for i, s in enumerate(samples) if i not in valid]
    valid_samples = [s for i, s in enumerate(samples) if i in valid]
    train_tokens = write_split(out / "train" / "en", train_samples)
    valid_tokens = write_split(out / "valid" / "en", valid_samples)
    print(f"number of train dataset: {len(train_samples)}, number of train dataset token: {train_tokens}")
    print(f"number of validation dataset: {len(valid_samples)}, number of validation dataset token: {valid_tokens}")


if __name__ == "__main__":
    main()
