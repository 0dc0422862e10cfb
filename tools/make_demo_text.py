"""Build a real-text demo dataset from the Python standard library's own source code (present on every machine).

    python tools/make_demo_text.py --output_dir RUN/demo_text_data [--vocab_size 2000] [--max_files N]
    python launch.py --config=configs/demo_text.py

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites and installed packages left out, sorted,
the first ``--max_files``) become one sample each. A small byte-fallback BPE SentencePiece model is trained on their
lines (so any text round-trips), saved as ``DIR/tokenizer.model``, and ``tools/tokenizer.py`` writes the samples to
``DIR/train/code/stdlib.bin`` + ``.meta`` (``[bos] + ids + [eos]`` each). Last, the unigram entropy of the token
stream is printed in nats: the loss of the best model that ignores context, which a trained model should beat.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece

from internevo_jax.data.tokenized import atomic_outputs, open_folder

TOKENIZER_TOOL = Path(__file__).resolve().parent / "tokenizer.py"
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}  # huge or not the stdlib's own
DEFAULT_DIR, DEMO_VOCAB = Path("RUN/demo_text_data"), 2000  # what configs/demo_text.py reads
MIN_VOCAB = 400
TRAIN_LINES = 200_000  # SentencePiece samples this many lines: more adds minutes, not quality


def stdlib_files(max_files: int | None) -> list[Path]:
    """The standard library's own ``.py`` files in sorted order, at most ``max_files``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise SystemExit(f"error: no .py files under the standard library folder {root}")
    return files[:max_files]


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A BPE SentencePiece model for code: whitespace kept as is, newline a piece of its own, bytes as fallback."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",  # trains in seconds where the default unigram takes minutes
        normalization_rule_name="identity",  # code: no NFKC, no collapsed indentation
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters become byte pieces
        split_digits=True,
        hard_vocab_limit=False,  # a small --max_files corpus may not fill the vocabulary
        input_sentence_size=TRAIN_LINES,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 14,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def unigram_entropy(train_folder: Path) -> tuple[float, int]:
    """(entropy in nats of the token frequencies, token count) over every sample of ``train_folder``."""
    _, files = open_folder(train_folder)
    counts = np.zeros(0, np.int64)
    for f in files:
        for i in range(len(f)):
            c = np.bincount(np.abs(f.tokens(i)))
            counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
            counts[: len(c)] += c
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI: output folder, vocabulary size, file limit."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", default=str(DEFAULT_DIR), help="for tokenizer.model and train/code/ (default %(default)s)"
    )
    parser.add_argument(
        "--vocab_size", type=int, default=DEMO_VOCAB, help="SentencePiece vocabulary (default %(default)s)"
    )
    parser.add_argument("--max_files", type=int, default=None, help="use only the first N files (default: all)")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        parser.error(f"--vocab_size {args.vocab_size}: need >= {MIN_VOCAB} (256 byte pieces, then the characters)")
    if args.max_files is not None and args.max_files < 1:
        parser.error("--max_files must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    t0 = time.time()
    files = stdlib_files(args.max_files)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    print(f"{len(files)} standard library files, {sum(map(len, texts)) / 1e6:.1f}M characters")

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "tokenizer.model"
    with atomic_outputs(model_path) as (f,):
        f.write(train_tokenizer(texts, args.vocab_size))
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    print(f"trained a {vocab}-piece BPE tokenizer: {model_path} ({time.time() - t0:.0f}s)")

    bin_path = out / "train" / "code" / "stdlib.bin"
    sys.stdout.flush()  # keep this tool's lines and tokenizer.py's in order
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stdlib.jsonl"
        raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        cmd = [sys.executable, str(TOKENIZER_TOOL), "--text_input_path", str(raw), "--bin_output_path", str(bin_path)]
        subprocess.run(cmd + ["--tokenizer_path", str(model_path), "--overwrite"], check=True)

    entropy, tokens = unigram_entropy(out / "train")
    print(
        f"unigram entropy of the {tokens:,}-token stream: {entropy:.3f} nats (a model that ignores context cannot "
        f"get its loss below this; uniform over the vocabulary would be {math.log(vocab):.3f})"
    )
    hint = "" if out.resolve() == DEFAULT_DIR.resolve() else f" --config.data.train_folder='{out / 'train'}'"
    hint += f" --config.model.vocab_size={vocab}" if vocab > DEMO_VOCAB else ""
    print(f"done in {time.time() - t0:.0f}s; train with: python launch.py --config=configs/demo_text.py{hint}")


if __name__ == "__main__":
    main()
