"""The OpenAI-compatible HTTP front of a continuous-batching `generation.engine.Engine` (FastAPI).

    engine = Engine(module, params, processor, max_batch=16, max_model_len=2048)
    app = create_app(engine, processor, model_name="vip-llava-7b", start_engine=True)  # warm-up at startup
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints:

* ``POST /v1/chat/completions`` (`schema.ChatCompletionRequest`). The messages are rendered with the
  checkpoint's own chat template (`Processor.apply_chat_template`; llava-hf's VipLlava template, with a warning
  in the log, for a checkpoint without one), images and all, and submitted to the engine; one engine thread owns
  the device and decodes every running request together (`Engine`). ``stream: true`` answers Server-Sent Events
  of ``chat.completion.chunk`` (a first chunk with the role, content deltas, a chunk with the finish reason, a
  usage chunk with ``stream_options.include_usage``) ending with ``data: [DONE]``.
  - Image parts (``image_url.url``): ``data:image/...;base64,...``; ``file://PATH`` only when the app has
    ``allowed_local_media_path`` and PATH, symlinks and ``..`` resolved, lies inside it; ``http(s)://``, fetched
    with a timeout where a network exists. At most ``max_image_bytes`` bytes and ``max_image_pixels`` pixels.
  - Sampling: ``temperature`` 0 is greedy; left out, the checkpoint's generation_config.json decides (greedy
    unless it sets ``do_sample``, as vLLM's default ``--generation-config auto``). ``top_p``, ``seed``
    (sampling is reproducible per seed), ``stop`` (added to the template's own end of turn, ``###`` for
    ``###Human:`` templates; the text is cut before the first stop string and stripped, as `generate_text`
    answers). ``max_tokens`` / ``max_completion_tokens``: left out, what fits in ``max_model_len`` after the
    prompt; a value that does not fit is a 400, as OpenAI answers.
  - ``usage``, as OpenAI counts: ``prompt_tokens`` are the tokens the model reads for the prompt, the image
    tokens included (each image counts as the image_seq_length tokens it becomes, as OpenAI bills image input as
    prompt tokens), with the BOS token; ``completion_tokens`` the tokens the model generated, the EOS or the
    token that completed a stop string included (OpenAI and vLLM count the finishing token too), even though
    the returned text leaves them out.
  - Greedy answers equal `generate` for the request alone, whatever else runs (the engine's guarantee).
* ``GET /v1/models``, ``GET /health`` (503 until the engine's warm-up is done or when it failed, then 200),
  ``GET /metrics`` (Prometheus text, `metrics.Metrics`).

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed JSON body, a
missing or malformed field, an unsupported setting (``n`` other than 1, logprobs, tools, ...), an image that
cannot be read, is too large or is not allowed, and a prompt longer than ``max_model_len - 1`` tokens; 401 for a
missing or wrong ``Authorization: Bearer`` key when the app has ``api_key`` (``/v1/*`` only; ``/health`` and
``/metrics`` stay open); 404 for another ``model``; 413 for a body over ``max_body_bytes``; 429 with
``Retry-After`` when the engine's queue is full; 503 when the engine is stopped. None of them reaches the engine,
and a request that fails inside the engine fails alone. A client that disconnects (mid-stream, or while a
non-streaming answer is being generated) cancels its request: its slot is free at the next decode chunk.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

import jinja2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ..data import chat
from ..data.images import load_image
from ..data.prompts import VIPLLAVA_CHAT_TEMPLATE
from ..generation.engine import EngineStopped, QueueFull
from ..generation.stop_strings import cut_at_stop, partial_stop_len
from . import schema
from .metrics import CONTENT_TYPE_LATEST, Metrics

__all__ = ["create_app", "default_stop", "TextDeltas", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_IMAGE_BYTES",
           "DEFAULT_MAX_IMAGE_PIXELS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 2**20  # a request body (JSON, images as data URLs included)
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20  # one image's encoded bytes (OpenAI's limit per image)
DEFAULT_MAX_IMAGE_PIXELS = 64 * 2**20  # one image's width x height, checked from its header before decoding
FETCH_TIMEOUT = 10.0  # seconds, http(s) images
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def default_stop(template: str) -> tuple[str, ...]:
    """The stop strings a chat template's answers end with besides EOS: ``###`` for the ``###Human:`` family
    (llava_v0, llava-hf's VipLlava template), none for templates whose turns end with the EOS token."""
    return ("###",) if "###" in template else ()


class TextDeltas:
    """Token ids in, text out as `generate_text` answers: decoded (special tokens skipped), cut before the first
    stop string, stripped. While the answer runs, a tail that may begin a stop string, an incomplete UTF-8
    character and trailing whitespace are held back, so the deltas join to exactly the final text."""

    def __init__(self, processor, stop: Sequence[str]):
        self.processor, self.stop = processor, tuple(stop)
        self.ids: list[int] = []
        self.shown = ""

    def text(self, final: bool) -> str:
        decoded = self.processor.decode(self.ids)
        text = cut_at_stop(decoded, self.stop)
        if not final and len(text) == len(decoded):
            text = text[: len(text) - partial_stop_len(text, self.stop)].rstrip("\ufffd")
        return text.strip()

    def feed(self, new_ids, final: bool = False) -> str:
        self.ids.extend(int(t) for t in new_ids)
        text = self.text(final)
        if len(text) > len(self.shown) and text.startswith(self.shown):
            delta, self.shown = text[len(self.shown):], text
            return delta
        return ""


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_response(e: schema.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(engine, processor, *, model_name: str = "vipllava", start_engine: bool = False,
               stop_grace_s: float = 30.0, allowed_local_media_path: str | os.PathLike | None = None,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               chat_template: str | None = None, generation_defaults: dict | None = None,
               retry_after_s: int = 1) -> FastAPI:
    """A FastAPI app serving ``engine`` (a `generation.engine.Engine`) with ``processor`` (its `data.Processor`).

    model_name: the id /v1/models lists and requests may name. start_engine: start the engine (warm-up included)
      when the app starts and stop it (``stop_grace_s``: running requests may finish) when it shuts down; False
      for an engine the caller starts and stops. allowed_local_media_path: the directory file:// images may come
      from (None: no file:// images). api_key: the Bearer key /v1/* requires (None: none). chat_template: a
      template string overriding the checkpoint's. generation_defaults: {"temperature", "top_p"} for requests
      that leave them out (default: the checkpoint's generation_config.json, read by the CLI; greedy).
    """
    template = chat.select_template(processor.chat_template, chat_template)
    if template is None:
        log.warning("the checkpoint has no chat template: using llava-hf's VipLlava template "
                    "('###Human: <image>\\n...###Assistant:')")
        template = VIPLLAVA_CHAT_TEMPLATE
    base_stop = default_stop(template)
    media_root = None
    if allowed_local_media_path is not None:
        media_root = Path(allowed_local_media_path).resolve(strict=True)
        if not media_root.is_dir():
            raise NotADirectoryError(f"allowed_local_media_path {allowed_local_media_path} is not a directory")
    defaults = {"temperature": 0.0, "top_p": 1.0, **(generation_defaults or {})}
    metrics = Metrics(engine)
    max_len = engine.max_model_len
    created_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                await asyncio.to_thread(engine.stop, stop_grace_s)

    app = FastAPI(title="vipllava-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.template = engine, metrics, template

    @app.exception_handler(schema.APIError)
    async def api_error(request: Request, e: schema.APIError):
        return _error_response(e)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(schema.error_body(f"Internal server error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    # -- checks ------------------------------------------------------------------------------------------------
    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise schema.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_big = schema.APIError(413, f"The request body is over this server's limit of {max_body_bytes} bytes",
                                  code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        buf = bytearray()
        async for piece in request.stream():
            buf += piece
            if len(buf) > max_body_bytes:
                raise too_big
        return bytes(buf)

    def parse(raw: bytes) -> schema.ChatCompletionRequest:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise schema.APIError(400, f"Malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise schema.APIError(400, f"The JSON body must be an object, got {type(data).__name__}",
                                  code="invalid_json")
        try:
            req = schema.ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise schema.validation_error(e) from None
        bad = req.unsupported()
        if bad:
            raise schema.APIError(400, bad[1], param=bad[0], code="unsupported")
        if req.model is not None and req.model != model_name:
            raise schema.APIError(404, f"The model '{req.model}' does not exist: this server serves "
                                       f"'{model_name}'", param="model", code="model_not_found")
        return req

    # -- images ------------------------------------------------------------------------------------------------
    def image_bytes(url: str, where: str) -> bytes:
        def bad(msg, code="invalid_image"):
            return schema.APIError(400, f"{where}: {msg}", param=where, code=code)

        if url.startswith("data:"):
            try:
                data = chat.decode_data_url(url)
            except ValueError as e:
                raise bad(str(e)) from None
        elif url.startswith(("http://", "https://")):
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "vipllava-jax"})
                with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as r:
                    data = r.read(max_image_bytes + 1)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise bad(f"cannot fetch {url}: {getattr(e, 'reason', None) or e}", "image_fetch_failed") from None
        elif url.startswith("file:"):
            if media_root is None:
                raise bad("file:// images are not allowed: the server was started without "
                          "--allowed-local-media-path", "file_url_not_allowed")
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise bad(f"a file:// URL names a path on this machine (file:///path), got host "
                          f"{parsed.netloc!r}", "file_url_not_allowed")
            path = Path(urllib.parse.unquote(parsed.path))
            real = Path(os.path.realpath(path))
            if real != media_root and media_root not in real.parents:
                raise bad(f"{path} is outside the allowed local media path (symlinks and '..' resolved)",
                          "file_url_not_allowed")
            try:
                if real.stat().st_size > max_image_bytes:
                    raise bad(f"the image is {real.stat().st_size} bytes, over this server's limit of "
                              f"{max_image_bytes}", "image_too_large")
                data = real.read_bytes()
            except OSError as e:
                raise bad(f"cannot read {path}: {e.strerror or e}") from None
        else:
            raise bad("image_url.url must be a data:image/...;base64,... URL, an http(s) URL, or a file:// URL "
                      "(with --allowed-local-media-path)", "invalid_image_url")
        if len(data) > max_image_bytes:
            raise bad(f"the image is over this server's limit of {max_image_bytes} bytes", "image_too_large")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            raise bad("the image has too many pixels (Pillow's decompression-bomb limit)", "image_too_large") \
                from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise bad(f"cannot decode the image: {type(e).__name__}: {e}") from None
        if w * h > max_image_pixels:
            raise bad(f"the image is {w}x{h} = {w * h} pixels, over this server's limit of {max_image_pixels}",
                      "image_too_large")
        return data

    def load(url: str, where: str):
        data = image_bytes(url, where)
        try:
            return load_image(data)
        except ValueError as e:
            raise schema.APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None

    # -- a request: messages -> model inputs -> the engine -----------------------------------------------------
    def prepare(req: schema.ChatCompletionRequest, on_update):
        """On a worker thread: images, template, tokens, checks, and the engine's submit (QueueFull and
        EngineStopped pass through). Returns (engine request, stop strings)."""
        messages = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                parts = [{"type": "text", "text": m.content}]
            else:
                parts = []
                for j, p in enumerate(m.content or ()):
                    if isinstance(p, schema.TextPart):
                        parts.append({"type": "text", "text": p.text})
                    else:
                        parts.append({"type": "image", "image": load(p.image_url.url,
                                                                     f"messages[{i}].content[{j}].image_url.url")})
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": parts})
        try:
            enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, chat_template=template,
                                                processor_kwargs={"max_length": sys.maxsize})
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            raise schema.APIError(400, f"messages: {e}", param="messages") from None
        n = int(np.asarray(enc["attention_mask"]).sum())
        if n > max_len - 1:
            n_img = int((np.asarray(enc["input_ids"]) == engine.module.config.image_token_index).sum())
            raise schema.APIError(
                400, f"The messages are {n} tokens long ({n_img} of them image tokens), but this server's "
                     f"max_model_len is {max_len} (--max-model-len): a prompt can have at most {max_len - 1} tokens",
                param="messages", code="context_length_exceeded")
        want = req.new_tokens()
        if want is not None and n + want > max_len:
            name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise schema.APIError(
                400, f"{name}={want} does not fit: the messages are {n} tokens and max_model_len is {max_len}, "
                     f"leaving room for {max_len - n} new tokens", param=name, code="context_length_exceeded")
        stop = tuple(dict.fromkeys(base_stop + req.stop_strings()))
        temperature = defaults["temperature"] if req.temperature is None else req.temperature
        top_p = defaults["top_p"] if req.top_p is None else req.top_p
        try:
            handle = engine.submit(enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"],
                                   max_new_tokens=want, temperature=temperature, top_p=top_p,
                                   seed=req.seed, stop=stop, on_update=on_update)
        except (QueueFull, EngineStopped):
            raise
        except ValueError as e:
            raise schema.APIError(400, str(e), param="messages") from None
        return handle, stop

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        received = time.monotonic()
        try:
            check_key(request)
            req = parse(await read_body(request))
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()

            def on_update(_req, new, finished):  # engine thread
                loop.call_soon_threadsafe(q.put_nowait, (new, finished, time.monotonic()))

            try:
                handle, stop = await asyncio.to_thread(prepare, req, on_update)
            except QueueFull as e:
                raise schema.APIError(429, f"The server is busy: {e}. Retry later", type="rate_limit_error",
                                      code="queue_full", headers={"Retry-After": str(retry_after_s)}) from None
            except EngineStopped as e:
                raise schema.APIError(503, f"The server is shutting down or its engine stopped: {e}",
                                      type="server_error", code="engine_stopped") from None
        except schema.APIError as e:
            metrics.requests.labels(code=str(e.status)).inc()
            return _error_response(e)
        metrics.prompt_tokens.inc(handle.prompt_tokens)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        created = schema.now()
        deltas = TextDeltas(processor, stop)
        state = {"last": None, "closed": False}

        def close():
            """Once per request: cancel it if it still runs (its client went away), count how it ended."""
            if state["closed"]:
                return
            state["closed"] = True
            if not handle.done:
                handle.cancel()
                metrics.finished.labels(reason="cancelled").inc()
            else:
                metrics.finished.labels(reason=handle.finish_reason).inc()
                metrics.e2e.observe(time.monotonic() - received)

        async def updates(poll_disconnect: bool):
            """(new ids, finished) per decode chunk; the request is cancelled if the consumer goes away."""
            try:
                while True:
                    try:
                        new, finished, at = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if poll_disconnect and await request.is_disconnected():
                            log.info("client of %s disconnected: request cancelled", rid)
                            return
                        continue
                    metrics.tokens(received, state["last"], at, len(new))
                    if new:
                        state["last"] = at
                    yield new, finished
                    if finished:
                        return
            finally:
                close()

        def failure() -> schema.APIError:
            if handle.finish_reason == "error":
                return schema.APIError(500, f"Generation failed: {handle.error}", type="server_error",
                                       code="generation_failed")
            return schema.APIError(503, "The request was cancelled: the server is shutting down",
                                   type="server_error", code="cancelled")

        def usage():
            return schema.usage_body(handle.prompt_tokens, handle.completion_tokens)

        if not req.stream:
            async for new, finished in updates(poll_disconnect=True):
                deltas.ids.extend(int(t) for t in new)
            if not handle.done:  # the client went away
                metrics.requests.labels(code="499").inc()
                return Response(status_code=499)
            if handle.finish_reason not in ("stop", "length"):
                e = failure()
                metrics.requests.labels(code=str(e.status)).inc()
                return _error_response(e)
            metrics.requests.labels(code="200").inc()
            return JSONResponse(schema.completion_body(rid, created, model_name, deltas.text(final=True),
                                                       handle.finish_reason, usage()))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta, finish=None, **kw):
            return _sse(schema.chunk_body(rid, created, model_name, delta, finish, include_usage=include_usage,
                                          **kw))

        async def events():
            # On a disconnect Starlette cancels the task iterating this generator and then runs the response's
            # background task: `close` cancels the request there (and here, when the generator is closed).
            yield chunk({"role": "assistant", "content": ""})
            async for new, finished in updates(poll_disconnect=False):
                piece = deltas.feed(new, final=finished)
                if piece:
                    yield chunk({"content": piece})
            if handle.finish_reason in ("stop", "length"):
                yield chunk({}, handle.finish_reason)
                if include_usage:
                    yield chunk(None, usage=usage())
            else:
                yield _sse(failure().body())
            yield "data: [DONE]\n\n"

        metrics.requests.labels(code="200").inc()
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(close),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created_at,
                                            "owned_by": "vipllava-jax", "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "message": f"the engine failed: {engine.error}"},
                                status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "loading", "message": "warming up: compiling the engine's programs"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app
