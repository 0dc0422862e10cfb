"""Text around the token ids: a byte tokenizer for checkpoints without one, and streaming detokenization with stop
strings.

``ByteTokenizer``: a model trained without a tokenizer (the CPU demo, on dummy integer data) can still be talked to:
each UTF-8 byte is its id (the vocabulary must hold 256 ids). The replies of such a model are noise, but every path
of the server runs.

``TextStream`` turns the ids of one reply into text pieces as they arrive. It decodes the whole reply each time
(SentencePiece and byte-level BPE join pieces differently at word starts, so decoding ids one at a time would lose
spaces), sends only what was not sent, and holds back a tail that could still change: an incomplete UTF-8 character
(decoded as U+FFFD, for at most 3 tokens) or the start of a stop string. The first stop string found ends the reply,
without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Text <-> its UTF-8 bytes as ids (no BOS); ids past 255 decode to nothing."""

    hf: Any = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode(errors="replace")


class TextStream:
    """The text of one reply, piece by piece: ``push(token)`` returns the new text that is safe to send (and whether
    a stop string ended the reply); ``flush()`` the rest at the end. ``skip_ids`` (EOS, stop ids) are not text."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer, self.stops, self.skip = tokenizer, [s for s in stops if s], set(skip_ids)
        self.ids: list[int] = []
        self.sent = ""
        self.text = ""
        self.stopped = False
        self.unsettled = 0  # tokens in a row after which the text ended with U+FFFD

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if token not in self.skip:
            self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._send(self.text), True
        # A character of up to 4 UTF-8 bytes is complete after at most 3 more tokens; a replacement character that
        # lasts longer is in the reply for good (the model wrote invalid UTF-8), so it is sent.
        self.unsettled = self.unsettled + 1 if self.text.endswith("\ufffd") else 0
        safe = self.text.rstrip("\ufffd") if self.unsettled <= 3 else self.text
        for stop in self.stops:  # keep back the longest tail that a stop string starts with
            for n in range(min(len(stop) - 1, len(safe)), 0, -1):
                if safe.endswith(stop[:n]):
                    safe = safe[:-n]
                    break
        return self._send(safe), False

    def flush(self) -> str:
        return self._send(self.text)

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""  # nothing new, or earlier text re-decoded differently: wait for it to settle
        piece, self.sent = upto[len(self.sent) :], upto
        return piece
