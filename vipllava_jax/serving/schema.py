"""The request schema of ``POST /v1/chat/completions`` (pydantic), OpenAI's error body, and the response and
chunk bodies the server sends.

Fields are OpenAI's (https://platform.openai.com/docs/api-reference/chat/create). Taken: ``model``,
``messages`` (roles system / developer / user / assistant; content a string or a list of ``text`` and
``image_url`` parts), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop`` (a string or up to 4), ``n`` (1 only), ``stream``, ``stream_options.include_usage``. Fields the
server cannot honour (``logprobs``, ``tools``, penalties, ``logit_bias``, a JSON ``response_format``) are
refused when set to anything but their no-op value; any other unknown field is ignored, as OpenAI-compatible
servers do.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["TextPart", "ImageURL", "ImagePart", "Message", "StreamOptions", "ChatCompletionRequest", "APIError",
           "error_body", "validation_error", "completion_body", "chunk_body", "usage_body"]

MAX_STOP = 4  # OpenAI takes up to 4 stop sequences


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, no effect: one crop size per model


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused unless at their no-op value (see `unsupported`).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return tuple(s for s in stop if s)

    def new_tokens(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens; None: what fits."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first setting this server cannot honour, or None."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported: this server returns one choice per request (n=1)"
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            return "stop", f"stop takes at most {MAX_STOP} sequences, got {len(self.stop)}"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools", "tools and function calling are not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported by this server"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server (give 0 or leave it out)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None


class APIError(Exception):
    """An error answered as OpenAI answers it: HTTP ``status`` and ``{"error": {"message", "type", "param",
    "code"}}``; ``headers`` (Retry-After for 429) go with it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc(loc) -> str:
    """A pydantic error location as a field path (``messages[0].content[1].image_url.url``), without the names
    pydantic gives union members (``str``, ``list[...]``, the tag of a tagged union)."""
    out, tagged = "", False
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        if x == "str" or "[" in x:
            tagged = "tagged-union" in x
            continue
        if tagged and out.endswith("]"):  # the part's "type" tag, right after its index
            tagged = False
            continue
        out += ("." if out else "") + x
    return out


def validation_error(e: ValidationError) -> APIError:
    """A pydantic ValidationError as one 400: the deepest problem, its field path as ``param``, and how many more.
    A content that is neither a string nor a list of parts says so in one message."""
    errs = e.errors(include_url=False)
    paths = [_loc(x["loc"]) for x in errs]
    i = max(range(len(errs)), key=lambda k: len(errs[k]["loc"]))
    first, param = errs[i], paths[i] or None
    if first["type"] == "missing":
        msg = f"'{param}' is a required property" if param else first["msg"]
    elif param and param.endswith("content") and len(set(paths)) == 1 and len(errs) > 1:
        msg = f"{param}: must be a string or a list of text / image_url parts"
    else:
        msg = f"{param}: {first['msg']}" if param else first["msg"]
    more = len({p for p in paths if not (param or "").startswith(p)})  # union alternatives are not counted
    if more > 0:
        msg += f" (and {more} more problem(s))"
    return APIError(400, msg, param=param, code="missing" if first["type"] == "missing" else "invalid_value")


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None, *,
               usage: dict | None = None, include_usage: bool = False) -> dict:
    """One ``chat.completion.chunk``; ``delta`` None: the usage chunk (no choices). With ``include_usage`` every
    chunk carries ``"usage"`` (null but in the last), as OpenAI's stream does."""
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = usage
    return body


def now() -> int:
    return int(time.time())
