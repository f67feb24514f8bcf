"""Chat messages -> prompt (and model inputs), as transformers' `ProcessorMixin.apply_chat_template` does
(`Processor.apply_chat_template` is the front door; this module holds its pieces).

Messages take Hugging Face's form::

    [{"role": "system" | "user" | "assistant",
      "content": [{"type": "text", "text": "..."},
                  {"type": "image", "image": PIL_or_array} | {"type": "image", "path": "a.jpg"}
                  | {"type": "image", "url": "https://... or data:image/png;base64,..."}]}]

- The template is the checkpoint's own (`read_chat_template`), rendered with jinja2 the way transformers renders
  it (`render`: the same sandboxed environment, `trim_blocks` / `lstrip_blocks`, the loopcontrols extension and a
  `{% generation %}` tag, the `tojson` filter and the `raise_exception`, `strftime_now`, `dict`, `namespace`
  globals; the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's special
  tokens (`bos_token`, `eos_token`, ...) and the caller's keyword arguments; every value the template sees made
  plain JSON data first, so an image object shows as "<Image>").
- A plain string as content is turned into one text part before rendering (``[{"type": "text", "text": s}]``),
  so templates that `selectattr` on the parts see the text. **transformers differs here**: it renders the
  string as is, and llava-hf's template then drops the text silently (``###Human: ###Assistant:``).
- OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` parts become ``{"type": "image", "url": ...}``
  and keys whose value is None are dropped from a message, as in transformers.
- Images (`load_part_image`): ``"image"`` (a PIL image, a numpy array, or a string taken as "url"), ``"path"``,
  ``"url"`` (``http(s)://``: fetched with a timeout, a clear ValueError naming the URL when there is no network;
  ``data:image/...;base64,``: decoded, a clear ValueError when malformed; anything else: a file path) or
  ``"base64"`` (raw base64 or a data URL). Converted to RGB as `load_image` converts that kind of input, which is
  what HF's processor does.
- Visual prompts: an image part may carry ``"visual_prompt"``: one marker or a list of them, each a
  `visual_prompts` marker object or a dict ``{"kind": "rectangle", "box": [x0, y0, x1, y1], "color": "red", ...}``
  whose other keys are `visual_prompts.make_marker`'s for that kind (``box``; ``points``; ``xy`` and
  ``radius``; ``tail``, ``head`` and ``head_size``; ``mask`` as a path or array; and ``color``, ``width``,
  ``alpha``, ``normalized`` as the CLI's --color / --width / --alpha / --normalized). They are drawn on that
  image before preprocessing, as `vipllava-jax generate --box ...` draws them. The markers of the whole
  conversation are numbered in order, and ``<bbox>`` (= ``<bbox0>``), ``<bbox1>``, ... in any text part are
  replaced by their phrases ("within the red rectangle"), as the CLI and the training records do. Without
  visual prompts the text is left as it is.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import urllib.error
import urllib.request
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import visual_prompts as vp
from .images import load_image

__all__ = ["CHAT_TEMPLATE_FILE", "LEGACY_CHAT_TEMPLATE_FILE", "CHAT_TEMPLATE_DIR", "read_chat_template",
           "select_template", "normalize_conversation", "render", "template_variables", "image_parts",
           "load_part_image", "fetch_url", "decode_data_url", "markers_of", "apply_markers"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"  # {"chat_template": "..."}
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # NAME.jinja: named templates beside the default
FETCH_TIMEOUT = 10.0  # seconds, for http(s) image URLs
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, filled in each other
BBOX_RE = re.compile(r"<bbox(\d*)>")
DATA_URL_RE = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[^,;]*)*;base64,(.*)", re.DOTALL)


# --- the checkpoint's template -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read {path}: {e}") from e


def read_chat_template(model_dir) -> tuple[str | dict[str, str] | None, str | None]:
    """(template, where it came from) of a checkpoint directory; (None, None) when it has none.

    Looked up as transformers' processor looks (`ProcessorMixin.from_pretrained`, transformers 5):
    processor_config.json's "chat_template" key; else chat_template.json's "chat_template" (the legacy file);
    else chat_template.jinja, with any additional_chat_templates/NAME.jinja beside it as named templates (a
    dict, the default under "default"). Then, where transformers' processor has nothing (its tokenizer would
    still read it): tokenizer_config.json's "chat_template" (a string, or HF's list of {"name", "template"}).
    """
    d = Path(model_dir)
    proc = d / "processor_config.json"
    if proc.is_file():
        t = _read_json(proc).get("chat_template")
        if t is not None:
            return t, str(proc)
    extra = {}
    if (d / CHAT_TEMPLATE_DIR).is_dir():
        extra = {f.stem: f.read_text(encoding="utf-8") for f in sorted((d / CHAT_TEMPLATE_DIR).glob("*.jinja"))}
    legacy = d / LEGACY_CHAT_TEMPLATE_FILE
    if legacy.is_file():
        if extra:
            raise ValueError(f"{d}: a legacy {LEGACY_CHAT_TEMPLATE_FILE} together with {CHAT_TEMPLATE_DIR}/ "
                             f"templates (transformers refuses this too): keep one {CHAT_TEMPLATE_FILE} instead")
        t = _read_json(legacy).get("chat_template")
        if t is not None:
            return t, str(legacy)
    raw = d / CHAT_TEMPLATE_FILE
    if raw.is_file():
        extra["default"] = raw.read_text(encoding="utf-8")
    if extra:
        where = str(raw) if raw.is_file() else str(d / CHAT_TEMPLATE_DIR)
        return (extra["default"] if list(extra) == ["default"] else extra), where
    tok = d / "tokenizer_config.json"
    if tok.is_file():
        t = _read_json(tok).get("chat_template")
        if isinstance(t, list):  # HF's saved form of several templates
            t = {x["name"]: x["template"] for x in t}
        if t is not None:
            return t, str(tok)
    return None, None


def select_template(templates: str | Mapping[str, str] | None, chat_template: str | None) -> str | None:
    """The template string to render: `chat_template` (a template string, or the name of one of the
    checkpoint's named templates) or the checkpoint's default; None when there is neither."""
    if chat_template is not None:
        if isinstance(templates, Mapping) and chat_template in templates:
            return templates[chat_template]
        return chat_template
    if isinstance(templates, Mapping):
        if "default" in templates:
            return templates["default"]
        raise ValueError("The checkpoint has several chat templates but none named 'default': pass "
                         f"chat_template= one of {', '.join(templates)} (or a template string)")
    return templates


# --- rendering, as transformers.utils.chat_template_utils does ---------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore-prefixed attributes (as transformers)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads (what transformers uses to tell template kwargs from processor kwargs)."""
    tpl = _compile(template)
    return frozenset(jinja2.meta.find_undeclared_variables(tpl.environment.parse(template)))


def _plain(value: Any) -> Any:
    """What the template may see: JSON-like data only; any other object as a placeholder "<TypeName>"
    (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        return {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False, tools=None,
           documents=None, **variables) -> str:
    """`template` rendered for one conversation, as transformers' `render_jinja_template` renders it (no
    continue_final_message / assistant masks). `variables`: the tokenizer's special tokens and the caller's
    keyword arguments."""
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    chat = [_alias_reasoning(m) for m in _plain(list(messages))]
    return _compile(template).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                     add_generation_prompt=add_generation_prompt, **_plain(variables))


# --- messages --------------------------------------------------------------------------------------------------
def normalize_conversation(messages) -> list[dict]:
    """A copy of `messages` in the form templates read: keys whose value is None dropped, a plain-string content
    made one text part, OpenAI `image_url` parts made HF `image` parts. The caller's dicts are not modified."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        if "role" not in m:
            raise ValueError(f"message {i} has no 'role': {m!r}")
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or "type" not in part:
                    raise ValueError(f"message {i}, part {j} must be a dict with a 'type' ('text', 'image'), "
                                     f"got {part!r}")
                if part["type"] == "image_url" and "image_url" in part:
                    info = part["image_url"]
                    part = {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
                parts.append(dict(part))
            m["content"] = parts
        out.append(m)
    return out


def image_parts(messages: list[dict]) -> list[dict]:
    """The image parts of a normalized conversation, in order (message by message, part by part)."""
    return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if p.get("type") == "image"]


# --- images ------------------------------------------------------------------------------------------------------
def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The bytes at an http(s) URL; a ValueError naming the URL when it cannot be fetched (no network, ...)."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "vipllava-jax"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"Cannot fetch image {url}: {reason}. Without a network, give the image as a path, "
                         "a PIL image or a data:image/...;base64,... URL") from e


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/<type>;base64,<data>` URL; a ValueError saying what is wrong otherwise."""
    m = DATA_URL_RE.fullmatch(url.strip())
    if not m:
        raise ValueError(f"Malformed data URL {_short(url)!r}: expected data:image/<type>;base64,<base64 data>")
    data = "".join(m.group(1).split())  # whitespace (line breaks) allowed, as base64 decoders do
    if not data:
        raise ValueError(f"Malformed data URL {_short(url)!r}: no data after 'base64,'")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"Malformed data URL {_short(url)!r}: the data is not valid base64 ({e})") from e


def _load_string(s: str, what: str):
    if s.startswith(("http://", "https://")):
        data, name = fetch_url(s), s
    elif s.startswith("data:"):
        data, name = decode_data_url(s), f"data URL {_short(s, 40)!r}"
    else:
        return load_image(s)
    try:
        return load_image(data)
    except ValueError as e:
        raise ValueError(f"Cannot read the image of {what} {name}: {e}") from e


def load_part_image(part: Mapping):
    """The RGB PIL image of an image part: "image" (PIL image, array, or a string as "url"), "path", "url" or
    "base64" (see the module docstring)."""
    if part.get("image") is not None:
        src = part["image"]
        return _load_string(src, "image") if isinstance(src, str) else load_image(src)
    if part.get("path") is not None:
        return load_image(part["path"])
    if part.get("url") is not None:
        return _load_string(str(part["url"]), "url")
    if part.get("base64") is not None:
        b = str(part["base64"])
        if not b.startswith("data:"):
            b = "data:image/unknown;base64," + b
        return _load_string(b, "base64")
    raise ValueError(f"Image part {_plain(dict(part))!r} has no image: give 'image' (a PIL image or array), "
                     "'path', 'url' or 'base64'")


# --- visual prompts ---------------------------------------------------------------------------------------------
def _tuples(v):
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


def _marker(spec, where: str):
    if isinstance(spec, Mapping):
        kw = dict(spec)
        kind = kw.pop("kind", None)
        if kind is None:
            raise ValueError(f"{where}: a visual prompt dict needs 'kind' (one of {', '.join(vp.MARKER_KINDS)}), "
                             f"got {_plain(dict(spec))!r}")
        try:
            return vp.make_marker(kind, **{k: (v if k == "mask" else _tuples(v)) for k, v in kw.items()})
        except TypeError as e:
            raise ValueError(f"{where}: bad keys for a {kind} visual prompt: {e}") from e
    if getattr(spec, "kind", None) in vp.MARKER_KINDS:
        return spec
    raise ValueError(f"{where}: a visual prompt must be a marker (vipllava_jax.data.visual_prompts) or a dict "
                     f"{{'kind': ..., ...}}, got {spec!r}")


def markers_of(parts: list[dict]) -> list[list]:
    """The markers of each image part (parts' "visual_prompt": one marker / dict, or a list of them)."""
    out = []
    for i, p in enumerate(parts):
        spec = p.get("visual_prompt")
        specs = [] if spec is None else list(spec) if isinstance(spec, (list, tuple)) else [spec]
        out.append([_marker(s, f"image {i}") for s in specs])
    return out


def apply_markers(messages: list[dict], markers: list) -> list[dict]:
    """`<bbox>` / `<bboxN>` in the text parts replaced by the phrase of marker N (all markers of the
    conversation, in order); unchanged when there are no markers."""
    if not markers:
        return messages
    phrases = [vp.marker_phrase(m) for m in markers]

    def sub(match):
        n = int(match.group(1) or 0)
        if n >= len(phrases):
            raise ValueError(f"{match.group(0)} names marker {n} but the conversation has {len(phrases)} "
                             "visual prompt(s)")
        return phrases[n]

    for m in messages:
        for p in m.get("content") if isinstance(m.get("content"), list) else ():
            if p.get("type") == "text" and isinstance(p.get("text"), str):
                p["text"] = BBOX_RE.sub(sub, p["text"])
    return messages

