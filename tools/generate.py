"""Generate text from a checkpoint with InternEvo's ``generation`` settings (KV-cache decoding, one jit per bucket).

    python tools/generate.py --config=FILE [--config.generation.x=...] --prompts=PROMPTS.jsonl --output=OUT.jsonl
    python tools/generate.py --config.generation.ckpt_folder=RUN/ckpt --prompt "text" [--prompt "more"]

Weights come from ``generation.ckpt_folder``: one of our checkpoints (a step folder, or a checkpoint root: its newest
verified step) or a Hugging Face folder (config.json + *.safetensors), told apart automatically. Without
``--config`` the model section is the checkpoint's own (the config saved with it, or the HF config.json, computing in
its ``torch_dtype`` as transformers does).

Each prompt line is ``{"tokens": [ids...]}`` (used as is) or ``{"text": "..."}``, tokenized with
``generation.tokenizer_path`` or else ``data.tokenizer_path`` (a SentencePiece ``.model``: BOS + pieces, as
InternEvo's ``batch_tokenize``; or a Hugging Face tokenizer folder with its own special tokens), or else the
tokenizer files of an HF checkpoint folder. A folder whose only tokenizer file is ``tokenizer.model`` is a
SentencePiece model, not a Hugging Face tokenizer folder (``transformers`` would read it without the BOS). Each
output line is ``{"prompt": <the input record>, "tokens": [generated ids, the EOS included if it ended on one],
"finish_reason": "eos"|"length"}`` plus ``"text"`` (the generated tokens decoded, without the EOS) when a tokenizer
is known. ``--output`` is written to a temporary name and renamed, so it is never half there; without it the lines
go to stdout. Tokens/s are logged at the end. Exit code 2: a config, prompt or checkpoint problem (the message names
it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from internevo_jax.generate import PromptError
from internevo_jax.initialize import parse_args as parse_config_args


class TextTokenizer:
    """Prompt text <-> ids: a SentencePiece ``.model`` file or a Hugging Face tokenizer folder."""

    def __init__(self, path: str):
        from internevo_jax.config import local_path
        from internevo_jax.convert.hf_tokenizer import is_sentencepiece, sentencepiece_file

        self.path = local_path(path)
        self._sp = self._hf = None
        if Path(self.path).exists() and is_sentencepiece(self.path):  # a file, or a folder with only tokenizer.model
            import sentencepiece

            self.path = str(sentencepiece_file(self.path))
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
            return
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise PromptError(f"tokenizer {self.path}: a tokenizer folder needs transformers (pip install it)") from err
        self._hf = AutoTokenizer.from_pretrained(self.path, trust_remote_code=True)

    @property
    def hf(self) -> Any:
        """The ``transformers`` tokenizer of a tokenizer folder (chat template, special tokens), else None."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf(text)["input_ids"])
        bos = self._sp.bos_id()
        return ([bos] if bos >= 0 else []) + self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; ids past the tokenizer's vocabulary (a model vocab padded beyond it) decode to nothing."""
        size = len(self._hf) if self._hf is not None else self._sp.vocab_size()
        ids = [i for i in ids if i < size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)


def tokenizer_path(cfg: Any) -> str | None:
    """``generation.tokenizer_path``, else ``data.tokenizer_path``, else an HF checkpoint folder's tokenizer files."""
    from internevo_jax.config import local_path
    from internevo_jax.convert.detect import detect

    path = cfg.generation.tokenizer_path or cfg.data.tokenizer_path
    folder = cfg.generation.ckpt_folder
    if path is None and folder and detect(folder) == "hf":
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if any((Path(local_path(folder)) / n).is_file() for n in names):
            path = local_path(folder)
    return path


def load_config(config: str | None, overrides: list[str]) -> Any:
    """The config of ``--config`` with ``overrides``, or without it the checkpoint's own (``checkpoint_config`` of the
    last ``--config.generation.ckpt_folder=`` override); ``tools/serve.py`` loads its model the same way."""
    from internevo_jax import config as config_lib
    from internevo_jax.generate import checkpoint_config

    if config:
        return config_lib.load(config, overrides)
    folders = [o.split("=", 1)[1] for o in overrides if o.startswith("--config.generation.ckpt_folder=")]
    if not folders:
        raise config_lib.ConfigError("pass --config=FILE or --config.generation.ckpt_folder=FOLDER (or both)")
    folder = config_lib.parse_override(f"--config.generation.ckpt_folder={folders[-1]}")[1]
    return checkpoint_config(folder, overrides)


def read_prompts(args: argparse.Namespace) -> list[tuple[dict[str, Any], str]]:
    """``(record, where)`` for every prompt: ``--prompt`` texts, then the lines of ``--prompts``."""
    records = [({"text": text}, f"--prompt #{i + 1}") for i, text in enumerate(args.prompt or [])]
    if args.prompts:
        path = Path(args.prompts)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise PromptError(f"--prompts {path}: {e.strerror or e}") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PromptError(f"{where}: not a JSON object ({e})") from e
            if not isinstance(record, dict) or not ({"text", "tokens"} & set(record)):
                raise PromptError(f'{where}: expected {{"text": "..."}} or {{"tokens": [ids...]}}, got {line[:80]!r}')
            records.append((record, where))
    if not records:
        raise PromptError("no prompts: pass --prompts=FILE.jsonl or --prompt TEXT")
    return records


def prompt_ids(record: dict[str, Any], where: str, tokenizer: TextTokenizer | None) -> list[int]:
    if "tokens" in record:
        ids = record["tokens"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise PromptError(f"{where}: 'tokens' must be a list of ints")
        return ids
    if not isinstance(record["text"], str):
        raise PromptError(f"{where}: 'text' must be a string")
    if tokenizer is None:
        raise PromptError(
            f"{where}: a text prompt needs a tokenizer: set --config.generation.tokenizer_path (a SentencePiece "
            '.model or a Hugging Face tokenizer folder), or give {"tokens": [...]}'
        )
    return tokenizer.encode(record["text"])


def run(args: argparse.Namespace) -> int:
    from internevo_jax.generate import Generator, load_model
    from internevo_jax.monitoring.logger import get_logger

    log = get_logger()
    cfg = load_config(args.config, args.overrides)
    records = read_prompts(args)
    path = tokenizer_path(cfg)
    tokenizer = TextTokenizer(path) if path else None
    prompts = [prompt_ids(record, where, tokenizer) for record, where in records]

    t0 = time.perf_counter()
    model = load_model(cfg)
    log.info(f"model {cfg.model_type} loaded from {cfg.generation.ckpt_folder} in {time.perf_counter() - t0:.1f}s")
    generator = Generator(model, cfg.generation, seed=cfg.seed)
    for ids, (_, where) in zip(prompts, records, strict=True):
        generator.check(ids, where)
    t0 = time.perf_counter()
    outputs = generator.generate(prompts)
    seconds = time.perf_counter() - t0

    lines = []
    for (record, _), out in zip(records, outputs, strict=True):
        line: dict[str, Any] = dict(prompt=record, tokens=out.tokens, finish_reason=out.finish_reason)
        if tokenizer is not None:
            body = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
            line["text"] = tokenizer.decode(body)
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    if args.output:
        from internevo_jax.data.tokenized import atomic_outputs

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_outputs(args.output) as (f,):
            f.write("".join(lines).encode())
    else:
        sys.stdout.write("".join(lines))
    n = sum(len(o.tokens) for o in outputs)
    steady = seconds - generator.compile_seconds
    log.info(
        f"generated {n} tokens for {len(outputs)} prompts in {seconds:.2f}s: {n / seconds:.1f} tokens/s "
        f"({generator.compile_seconds:.1f}s of it compiling; {n / max(steady, 1e-9):.1f} tokens/s without)"
        + (f"; wrote {args.output}" if args.output else "")
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument("--config", help="a config .py file; default: the checkpoint's own model section")
    parser.add_argument("--prompts", help='a .jsonl file of {"text": ...} or {"tokens": [...]} lines')
    parser.add_argument("--prompt", action="append", help="a prompt text (repeatable)")
    parser.add_argument("--output", help="the .jsonl file to write (default: stdout)")
    return parse_config_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from internevo_jax.config import ConfigError
    from internevo_jax.errors import CheckpointError

    try:
        return run(args)
    except (ConfigError, CheckpointError, PromptError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
