"""The OpenAI request bodies the server accepts (pydantic, strict types: ``"5"`` is not an int) and its error shape.

Fields outside these models are ignored, as clients send extras (``user``, ``logprobs=None``); fields we cannot honour
with other values are refused (``n`` other than 1). ``top_k`` is an extension (0: off). ``max_length`` is InternEvo's
``/internlm/chat/completions`` field (prompt included, as Hugging Face's ``stream_chat``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """What both endpoints share."""

    model: str | None = None  # None: the served model (InternEvo's clients send none)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    max_length: Annotated[int, Field(ge=2)] | None = None  # InternEvo's: prompt + reply


def parse(model: type[BaseModel], body: Any) -> Any:
    """``body`` (decoded JSON) as ``model``, or an APIError 400 naming each bad field and what was wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))
            problems.append(f"'{where}': {err['msg']}")
        first = e.errors()[0]["loc"]
        raise APIError(400, "invalid request: " + "; ".join(dict.fromkeys(problems)), param=str(first[0])) from e
