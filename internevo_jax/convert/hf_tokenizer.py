"""The training tokenizer as a Hugging Face tokenizer, for exported model folders (``tools/convert_checkpoint.py``).

A SentencePiece ``.model`` (what ``data.tokenizer_path`` and ``tools/tokenizer.py`` use; training sees
``[bos] + sp.encode(text) + [eos]``) becomes ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json`` (plus the ``.model`` itself), which ``transformers.AutoTokenizer`` loads as a fast tokenizer
that encodes a text as ``[bos] + sp.encode(text)``, the prompt form: the SentencePiece normalizer (its precompiled
character map, whitespace rules and dummy prefix), model (unigram or BPE, byte fallback), special and user-defined
pieces and decoder are rebuilt in the ``tokenizers`` library, and the result is checked against SentencePiece on probe
texts before anything is written (``SentencePieceTokenizer``). One difference is deliberate, as in every Hugging Face
tokenizer: a special token's text (``<s>``) inside a text is read as that token; SentencePiece reads its characters.

A Hugging Face tokenizer folder is copied file by file (``HFTokenizerFolder``); a folder holding only
``tokenizer.model`` is a SentencePiece model, not a Hugging Face folder.

Either gives the special-token ids for ``config.json`` / ``generation_config.json``. Needs the ``tokenizers`` package
(it comes with ``transformers``), imported only here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from internevo_jax.errors import TokenizerError

# Files of a Hugging Face tokenizer folder (the remote-code tokenizer modules ``tokenization_*.py`` too).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)
# Texts on which the rebuilt tokenizer must encode and decode exactly as SentencePiece does.
PROBES = (
    "import os",
    "Hello world",
    "  two  spaces,\tand a tab\nand a newline\n\n",
    " leading and trailing space ",
    "numbers 0123456789 3.14 -7",
    "punctuation: (a, b); [c]! {d}? 'e' \"f\" a-b_c/d\\e",
    "Zürich café naïve Ångström",
    "東京 中文分词 日本語のテキスト 한국어",
    "ＡＢＣ１２３ ① ﬁ",
    "emoji 😀👍 and a\u00a0non-breaking space",
    "def f(x):\n    return x  + 1\n",
    "",
)


def _require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise TokenizerError(
            "writing a Hugging Face tokenizer needs the tokenizers package, which comes with transformers: "
            "pip install transformers (or drop --tokenizer)"
        ) from err
    return tokenizers


def is_sentencepiece(path: str | Path) -> bool:
    """A SentencePiece model: a file, or a folder whose only tokenizer file is ``tokenizer.model``."""
    path = Path(path)
    if path.is_file():
        return True
    return (path / "tokenizer.model").is_file() and not any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    )


def sentencepiece_file(path: str | Path) -> Path:
    """The ``.model`` file of a SentencePiece ``path`` (a file, or a folder holding ``tokenizer.model``)."""
    path = Path(path)
    return path if path.is_file() else path / "tokenizer.model"


def load(path: str | Path, model_max_length: int | None = None) -> SentencePieceTokenizer | HFTokenizerFolder:
    """The exportable tokenizer at ``path``: a SentencePiece model (file, or folder with only ``tokenizer.model``)
    or a Hugging Face tokenizer folder."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer {path}: no such file or folder")
    if is_sentencepiece(path):
        return SentencePieceTokenizer(sentencepiece_file(path), model_max_length)
    return HFTokenizerFolder(path)


class SentencePieceTokenizer:
    """A SentencePiece model rebuilt as a ``tokenizers.Tokenizer`` and checked against SentencePiece on ``PROBES``.

    ``bos_id``/``eos_id``/``pad_id``/``unk_id``: SentencePiece's (None where the model has none). ``save(folder)``
    writes the Hugging Face files and a copy of the ``.model``.
    """

    def __init__(self, path: str | Path, model_max_length: int | None = None):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        self.path, self.model_max_length = Path(path), model_max_length
        data = self.path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
            # protobuf makes ModelProto when the module loads: sentencepiece's types do not declare it
            proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
            proto.ParseFromString(data)
        except Exception as err:
            raise TokenizerError(f"tokenizer {self.path} is not a SentencePiece model ({err})") from err
        self.proto = proto
        spec = proto.trainer_spec
        ids = {key: getattr(spec, f"{key}_id") for key in ("bos", "eos", "pad", "unk")}
        size = len(proto.pieces)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (i if 0 <= i < size else None for i in ids.values())
        self.tokenizer = self._build()
        self._check()

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.proto.pieces[i].piece

    def _build(self) -> Any:
        tokenizers = _require_tokenizers()
        from tokenizers import AddedToken, Regex, decoders, normalizers, processors
        from tokenizers.models import BPE, Model, Unigram

        proto, spec, norm = self.proto, self.proto.trainer_spec, self.proto.normalizer_spec
        if spec.treat_whitespace_as_suffix:
            raise TokenizerError(f"tokenizer {self.path}: treat_whitespace_as_suffix is not rebuilt for Hugging Face")
        pieces = [(p.piece, p.score) for p in proto.pieces]
        model: Model
        if spec.model_type == 1:  # UNIGRAM
            model = Unigram(pieces, unk_id=self.unk_id, byte_fallback=spec.byte_fallback)
        elif spec.model_type == 2:  # BPE: SentencePiece merges the pair whose piece scores highest
            model = BPE(
                {piece: i for i, (piece, _) in enumerate(pieces)},
                _merges(proto),
                unk_token=self.token(self.unk_id),
                fuse_unk=True,
                byte_fallback=spec.byte_fallback,
            )
        else:
            kind = {3: "WORD", 4: "CHAR"}.get(spec.model_type, spec.model_type)
            raise TokenizerError(
                f"tokenizer {self.path}: SentencePiece model type {kind} is not rebuilt (unigram, bpe)"
            )
        tok = tokenizers.Tokenizer(model)
        steps: list[normalizers.Normalizer] = []
        if norm.precompiled_charsmap:
            steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
        if norm.remove_extra_whitespaces:  # spaces only (after the charsmap), as SentencePiece
            steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        if norm.add_dummy_prefix:
            steps.append(normalizers.Prepend(" "))
        if norm.escape_whitespaces:
            steps.append(normalizers.Replace(" ", "▁"))
        if steps:
            tok.normalizer = normalizers.Sequence(steps)
        # Control pieces (<s>, </s>) are special; user-defined symbols are matched whole, before the normalizer.
        tok.add_special_tokens(
            [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3]
        )
        tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == 4])
        if self.bos_id is not None:
            bos = self.token(self.bos_id)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)]
            )
        decode: list[decoders.Decoder] = [decoders.Replace("▁", " ")] if norm.escape_whitespaces else []
        decode += [decoders.ByteFallback()] if spec.byte_fallback else []
        decode.append(decoders.Fuse())
        if norm.add_dummy_prefix:
            decode.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decode)
        return tok

    def _check(self) -> None:
        head = [] if self.bos_id is None else [self.bos_id]
        for text in PROBES:
            want, got = head + self.sp.encode(text), self.tokenizer.encode(text).ids
            if got != want:
                raise TokenizerError(
                    f"tokenizer {self.path}: the Hugging Face tokenizer rebuilt from it encodes {text!r} as {got}, "
                    f"SentencePiece as {want}; pass a Hugging Face tokenizer folder that matches it instead"
                )
            if self.unk_id in want:  # SentencePiece writes an unknown piece as " ⁇ ", Hugging Face drops it
                continue
            want_text, got_text = self.sp.decode(want), self.tokenizer.decode(got, skip_special_tokens=True)
            if got_text != want_text:
                raise TokenizerError(
                    f"tokenizer {self.path}: the Hugging Face tokenizer rebuilt from it decodes {want} as "
                    f"{got_text!r}, SentencePiece as {want_text!r}; pass a Hugging Face tokenizer folder instead"
                )

    def special_tokens(self) -> dict[str, str]:
        """``special_tokens_map.json``: the bos/eos/unk/pad pieces the model has."""
        names = dict(bos_token=self.bos_id, eos_token=self.eos_id, unk_token=self.unk_id, pad_token=self.pad_id)
        return {name: self.proto.pieces[i].piece for name, i in names.items() if i is not None}

    def save(self, folder: str | Path) -> list[str]:
        """Writes the tokenizer into ``folder``; returns the file names."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        special = self.special_tokens()
        config = dict(
            tokenizer_class="PreTrainedTokenizerFast",  # loads tokenizer.json as is, in transformers 4 and 5
            add_bos_token=self.bos_id is not None,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            **({} if self.model_max_length is None else dict(model_max_length=self.model_max_length)),
            **special,
        )
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        shutil.copyfile(self.path, folder / "tokenizer.model")
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


def _merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's rule (merge the adjacent pair whose piece has the highest score):
    every split of a normal piece into two pieces, ranked by the merged piece's score (transformers' order)."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for p in proto.pieces:
        if p.type != 1:  # control, unknown, user-defined, unused and byte pieces are never merged into
            continue
        local = [(p.piece[:i], p.piece[i:]) for i in range(1, len(p.piece))]
        local = sorted(
            (lr for lr in local if lr[0] in vocab and lr[1] in vocab), key=lambda lr: (vocab[lr[0]], vocab[lr[1]])
        )
        merges += [(left, right, p.score) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


class HFTokenizerFolder:
    """A Hugging Face tokenizer folder, copied as it is; its special-token ids come from ``transformers``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = [self.folder / n for n in HF_TOKENIZER_FILES if (self.folder / n).is_file()]
        self.files += sorted(self.folder.glob("tokenization_*.py"))  # a remote-code tokenizer's module
        if not any(f.name in ("tokenizer.json", "tokenizer_config.json") for f in self.files):
            raise TokenizerError(
                f"tokenizer {self.folder}: neither a SentencePiece .model nor a Hugging Face tokenizer folder "
                "(tokenizer.json or tokenizer_config.json)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise TokenizerError(
                f"tokenizer {self.folder}: reading a Hugging Face tokenizer folder needs transformers "
                "(pip install transformers), or pass the SentencePiece .model"
            ) from err
        try:  # as data.tokenizer_path loads it (remote code included)
            tok = AutoTokenizer.from_pretrained(str(self.folder), trust_remote_code=True)
        except Exception as err:
            raise TokenizerError(
                f"tokenizer {self.folder}: transformers.AutoTokenizer could not load it ({type(err).__name__}: {err})"
            ) from err
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def save(self, folder: str | Path) -> list[str]:
        for f in self.files:
            shutil.copyfile(f, Path(folder) / f.name)
        return [f.name for f in self.files]
