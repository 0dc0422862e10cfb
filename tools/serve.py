"""Serve a checkpoint over HTTP: an OpenAI-compatible API (streaming too), InternEvo's ``/internlm`` routes and a
chat page at ``/``.

    python tools/serve.py --config.generation.ckpt_folder=RUN/demo/ckpt [--port=8000] [--api-key=KEY]
    python tools/serve.py --config=configs/7b_sft.py --config.generation.ckpt_folder=RUN/7b/ckpt --host=0.0.0.0

The model, weights and tokenizer load as ``tools/generate.py`` loads them (our checkpoint or a Hugging Face folder;
without ``--config`` the checkpoint's own model section). ``generation.max_length`` is the context a request's
prompt + reply must fit in; the ``generation`` EOS ids end every reply. Without a tokenizer a model whose vocabulary
holds 256 ids talks in UTF-8 bytes (the CPU demo does). ``--max-batch-size`` requests decode together
(``internevo_jax/serving/engine.py`` explains the batching); more wait for a free slot. Needs the ``serve`` extra:
``pip install -e '.[serve]'``. Exit code 2: a config, tokenizer or checkpoint problem (the message names it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout works without `pip install -e .`
from internevo_jax.generate import PromptError  # noqa: E402
from internevo_jax.initialize import parse_args as parse_config_args  # noqa: E402

if __package__:  # internevo_jax.tools.serve (the console script) or tools.serve
    from .generate import TextTokenizer, load_config, tokenizer_path
else:  # python tools/serve.py: this folder is on sys.path
    from generate import TextTokenizer, load_config, tokenizer_path  # type: ignore[no-redef]


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from internevo_jax.serving.app import create_app
    except ImportError as e:
        print(f"serving needs the serve extra ({e.name} is missing): pip install -e '.[serve]'", file=sys.stderr)
        return 2
    from internevo_jax import config as config_lib
    from internevo_jax.generate import eos_ids, load_model
    from internevo_jax.monitoring.logger import get_logger
    from internevo_jax.serving.engine import Engine
    from internevo_jax.serving.text import ByteTokenizer

    log = get_logger()
    cfg = load_config(args.config, args.overrides)
    path = tokenizer_path(cfg)
    if path:
        tokenizer = TextTokenizer(path)
    elif cfg.model.vocab_size >= 256:
        tokenizer = ByteTokenizer()
        log.warning("no tokenizer (generation.tokenizer_path / data.tokenizer_path): text is read as UTF-8 bytes")
    else:
        raise config_lib.ConfigError(
            f"no tokenizer and a vocabulary of {cfg.model.vocab_size} ids (too few for bytes): set "
            "--config.generation.tokenizer_path (a SentencePiece .model or a Hugging Face tokenizer folder)"
        )
    if args.max_batch_size < 1:
        raise config_lib.ConfigError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    model = load_model(cfg)
    folder = str(cfg.generation.ckpt_folder).removeprefix("local:").rstrip("/")
    name = args.served_model_name or model_name(folder)
    engine = Engine(model, cfg.generation.max_length, args.max_batch_size, eos_ids(cfg.generation))
    seconds = engine.warm_up([1, 17])  # the decode step and the two smallest prefill buckets
    log.info(f"model {name} ({cfg.model_type}) ready in {seconds:.1f}s of compiling; context {engine.max_length}")
    engine.start()
    app = create_app(engine, tokenizer, name, api_key=args.api_key)
    log.info(f"serving on http://{args.host}:{args.port} (the chat page at /, the API at /v1)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def model_name(folder: str) -> str:
    """The served model's default id: the checkpoint folder's name, above ``ckpt`` and step folders (RUN/demo/ckpt/60
    -> demo)."""
    path = Path(folder)
    while path.name.isdigit() or path.name == "ckpt":
        path = path.parent
    return path.name or "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Override any config field with --config.section.key=value."
    )
    parser.add_argument("--config", help="a config .py file; default: the checkpoint's own model section")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (slots)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder name)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (warning: no access log)")
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
