"""``vipllava-jax generate``: answer a question about one or more images, streaming the answer.

    vipllava-jax generate --model llava-hf/vip-llava-7b-hf --image photo.jpg --box 40,60,200,220 \\
        --prompt "What is inside the red rectangle?" --save-marked marked.png
    vipllava-jax generate --model /data/vip-llava-7b-orbax --image a.jpg --chat
    vipllava-jax generate --model DIR --messages chat.json     # HF-form chat messages, images inside

--prompt is formatted by the checkpoint's own chat template (one user turn: the images, then the prompt, and the
assistant cue); --prompt-style llava_v0|llava_v1 writes the prompt in that format instead. The model directory is
an HF checkpoint (or hub id) or an orbax directory from ``vipllava-jax convert``; its tokenizer and processor
files are read from the same directory. Markers (--box, --arrow, ...) are drawn on the first image before the
processor resizes and crops it, as ViP-LLaVA's training did.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from ..checkpoints.load import load_config, load_pretrained, resolve_model_path
from ..data import visual_prompts as vp
from ..data.images import load_image
from ..data.processor import Processor
from ..data.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt, stop_for_template
from ..generation.pipeline import chat_prompt, chat_stop_strings
from ..generation.text import generate_text, generate_text_stream
from ..parallel.distributed import add_distributed_args, initialize_from_args, is_main_process, mesh_from_args
from .common import DEFAULT_CACHE_DIR, DTYPES, auto_dtype, enable_compilation_cache, add_quantize_args, quantize_kwargs

DEFAULT_MAX_NEW_TOKENS = 256


def _floats(n: int | None, name: str):
    def parse(s: str) -> tuple[float, ...]:
        try:
            v = tuple(float(x) for x in s.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} wants comma-separated numbers, got {s!r}") from None
        if not all(math.isfinite(x) for x in v):
            raise argparse.ArgumentTypeError(f"{name} wants finite numbers, got {s!r}")
        if n is not None and len(v) != n:
            raise argparse.ArgumentTypeError(f"{name} wants {n} numbers, got {len(v)} in {s!r}")
        if n is None and (len(v) < 4 or len(v) % 2):
            raise argparse.ArgumentTypeError(f"{name} wants x0,y0,x1,y1 (a box) or more x,y pairs, got {s!r}")
        return v
    return parse


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt about images (streams the answer)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, hub id, or orbax directory")
    p.add_argument("--no-verify", action="store_true",
                   help="orbax directory: skip checking each file's checksum before loading (faster; a file "
                        "damaged in place then loads as weights)")
    add_quantize_args(p)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory (RUN_DIR/adapter, or one saved by peft) merged into the model")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeat for several)")
    p.add_argument("--prompt", action="append", default=None,
                   help="the question (repeat for a batch of prompts about the same images); '<bbox>' is "
                        "replaced by the first marker's phrase, e.g. 'within the red rectangle'")
    p.add_argument("--chat", action="store_true",
                   help="keep a conversation: read follow-up questions from stdin (an empty line or 'exit' ends "
                        "it, '/reset' starts over; when the context is full the oldest turns are dropped)")
    p.add_argument("--messages", default=None, metavar="FILE.json",
                   help="a whole conversation as HF chat messages (a JSON list of {'role', 'content'}; image parts "
                        "{'type': 'image', 'path' | 'url' | 'base64': ...}), formatted by the checkpoint's chat "
                        "template; instead of --prompt / --image / --chat")
    p.add_argument("--system", default=None,
                   help="system text: a system message through the chat template (default: none, the template's "
                        "own); with --prompt-style, that format's system text (default: its system prompt). "
                        "llava-hf's template shows a system message twice, as transformers renders it: use "
                        "--prompt-style llava_v0 --system TEXT there")
    p.add_argument("--prompt-style", choices=("llava_v0", "llava_v1"), default=None,
                   help="write the prompt in this format instead of the checkpoint's chat template: llava_v0 "
                        "(`###Human: ...###Assistant:`, the HF model card's) or llava_v1 (`USER: ... ASSISTANT:`, "
                        "the original training's / ViP-Bench's)")
    p.add_argument("--pad-to-square", action="store_true",
                   help="pad images to a square with the CLIP mean colour instead of centre-cropping "
                        "(the original training's preprocessing; keeps markers near the edges)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"at most this many new tokens (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in the "
                        f"model's context after the prompt; a larger explicit value is an error)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help='stop string (default: "###")')
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="parameter/compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    g.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    g.add_argument("--compilation-cache", default=str(DEFAULT_CACHE_DIR),
                   help="JAX persistent compilation cache directory ('' to turn it off)")
    v = p.add_argument_group("visual prompts", "markers drawn on the first image (repeat a flag for several)")
    v.add_argument("--box", action="append", type=_floats(4, "--box"), default=[], metavar="X0,Y0,X1,Y1",
                   help="rectangle")
    v.add_argument("--ellipse", action="append", type=_floats(4, "--ellipse"), default=[], metavar="X0,Y0,X1,Y1")
    v.add_argument("--triangle", action="append", type=_floats(None, "--triangle"), default=[],
                   metavar="X0,Y0,X1,Y1[,X2,Y2]", help="a box (three seeded points in it) or three points")
    v.add_argument("--point", action="append", type=_floats(2, "--point"), default=[], metavar="X,Y")
    v.add_argument("--arrow", action="append", type=_floats(4, "--arrow"), default=[], metavar="X0,Y0,X1,Y1",
                   help="from tail (x0,y0) to head (x1,y1)")
    v.add_argument("--scribble", action="append", type=_floats(None, "--scribble"), default=[],
                   metavar="X0,Y0,X1,Y1|X,Y,...", help="a box (a seeded smooth stroke in it) or polyline points")
    v.add_argument("--mask", action="append", default=[], metavar="MASK.png", help="filled mask (nonzero = inside)")
    v.add_argument("--mask-contour", action="append", default=[], metavar="MASK.png", help="mask outline")
    v.add_argument("--color", action="append", default=None,
                   help="marker colour: a name (red, lime, blue, ...), #rrggbb or r,g,b; repeat to give each "
                        "marker its own, in the order above (default red)")
    v.add_argument("--width", type=int, default=None, help="line width in pixels (default: scales with image size)")
    v.add_argument("--alpha", type=float, default=None,
                   help="marker opacity in [0, 1] (default 1; 0.35 for --mask)")
    v.add_argument("--normalized", action="store_true", help="marker coordinates are in [0, 1], not pixels")
    v.add_argument("--save-marked", default=None, metavar="OUT.png",
                   help="save the image exactly as the model sees it (markers drawn, before resizing)")
    add_distributed_args(p)
    p.set_defaults(func=run)


def markers_from_args(args: argparse.Namespace) -> list:
    specs = ([("rectangle", b) for b in args.box] + [("ellipse", b) for b in args.ellipse]
             + [("triangle", b) for b in args.triangle] + [("point", b) for b in args.point]
             + [("arrow", b) for b in args.arrow] + [("scribble", b) for b in args.scribble]
             + [("mask", m) for m in args.mask] + [("mask_contour", m) for m in args.mask_contour])
    if not specs:
        return []
    colors = args.color or ["red"]
    if len(colors) not in (1, len(specs)) and specs:
        raise ValueError(f"--color given {len(colors)} times for {len(specs)} markers: give one colour for all "
                         f"or one per marker")
    out = []
    for i, (kind, v) in enumerate(specs):
        style = dict(color=colors[i if len(colors) > 1 else 0], width=args.width)
        if args.alpha is not None:
            style["alpha"] = args.alpha
        norm = dict(normalized=args.normalized)
        if kind in ("rectangle", "ellipse"):
            out.append(vp.make_marker(kind, box=v, **style, **norm))
        elif kind == "triangle":
            key = "box" if len(v) == 4 else "points"
            pts = v if key == "box" else tuple(zip(v[0::2], v[1::2]))
            if key == "points" and len(pts) != 3:
                raise ValueError(f"--triangle wants a box (4 numbers) or three points (6 numbers), got {len(v)}")
            out.append(vp.make_marker(kind, **{key: pts}, **style, **norm))
        elif kind == "point":
            out.append(vp.make_marker(kind, xy=v, **style, **norm))
        elif kind == "arrow":
            out.append(vp.make_marker(kind, tail=v[:2], head=v[2:], **style, **norm))
        elif kind == "scribble":
            if len(v) == 4:
                out.append(vp.make_marker(kind, box=v, **style, **norm))
            else:
                out.append(vp.make_marker(kind, points=tuple(zip(v[0::2], v[1::2])), **style, **norm))
        else:  # masks: the array is read at draw time, when the image size is known
            out.append((kind, v, style))
    return out


def _draw(image, markers, args):
    """Draw on the original image (before resize/crop). With --pad-to-square the result is padded here, so
    --save-marked shows the square image the model sees; otherwise a marker outside the centre crop is reported."""
    built = []
    for m in markers:
        if isinstance(m, tuple):
            kind, path, style = m
            built.append(vp.make_marker(kind, mask=vp.load_mask(path, size=image.size), **style))
        else:
            built.append(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = vp.draw_markers(image, built, pad_to_square=args.pad_to_square)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return out, built


def run(args: argparse.Namespace) -> int:
    initialize_from_args(args)
    enable_compilation_cache(args.compilation_cache)

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for q in args.prompt or ():
        check_text(q, "--prompt")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.messages is not None:
        given = [f for f, v in (("--prompt", args.prompt), ("--image", args.image), ("--chat", args.chat),
                                ("--system", args.system is not None), ("--prompt-style", args.prompt_style),
                                ("--save-marked", args.save_marked), ("markers", markers_from_args(args))) if v]
        if given:
            raise ValueError(f"--messages holds the whole conversation (system text, images and visual prompts "
                             f"in its parts): drop {', '.join(given)}")
    elif not args.prompt and not args.chat:
        raise ValueError("give --prompt (or --chat to type questions, or --messages FILE.json)")
    if args.chat and args.prompt and len(args.prompt) > 1:
        raise ValueError("--chat takes at most one --prompt (the first question)")
    markers = markers_from_args(args)
    if markers and not args.image:
        raise ValueError("markers (--box, --arrow, ...) are drawn on an image: give --image")
    if not markers and any("<bbox" in q for q in args.prompt or ()):
        raise ValueError("the prompt names a marker with <bbox>, but there is none: draw one with --box, "
                         "--ellipse, --point, --arrow, ... (or write the words, e.g. 'within the red rectangle')")

    # Inputs first: a bad image or a missing tokenizer fails before minutes of loading weights.
    model_dir = resolve_model_path(args.model)
    config = load_config(model_dir)  # config.json first: a bad one is named, not blamed on the tokenizer
    proc = Processor.from_pretrained(model_dir, pad_to_square=args.pad_to_square)
    encoded = _encode_messages(proc, args.messages) if args.messages is not None else None
    images = [load_image(src) for src in args.image]
    phrase = None
    if markers:
        images[0], built = _draw(images[0], markers, args)
        phrase = vp.marker_phrase(built[0])
        if args.save_marked and is_main_process():
            images[0].save(args.save_marked)
            print(f"[marked image saved to {args.save_marked}]", file=sys.stderr)
    elif args.save_marked:
        raise ValueError("--save-marked needs at least one marker (--box, --ellipse, --point, --arrow, ...)")

    dtype = auto_dtype(args.dtype)
    mesh = None
    if jax.device_count() > 1 or args.mesh not in (None, "", "auto"):
        mesh = mesh_from_args(args, config)
    t0 = time.perf_counter()
    module, params = load_pretrained(model_dir, dtype=jnp.dtype(dtype), mesh=mesh, progress=is_main_process(),
                                     verify=not args.no_verify,
                                     adapter=args.adapter, **quantize_kwargs(args))
    if is_main_process():
        print(f"[loaded {model_dir} as {dtype} in {time.perf_counter() - t0:.1f}s on "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)]", file=sys.stderr)
    style = args.prompt_style  # None: the checkpoint's chat template
    system = (DEFAULT_SYSTEM_PROMPT if style else None) if args.system is None else args.system
    stop = tuple(args.stop) if args.stop else stop_for_template(style) if style else chat_stop_strings(proc)
    # --max-new-tokens (refused when it does not fit after the prompt), or by default 256 lowered to what fits.
    gen = dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
               fit_context=args.max_new_tokens is None, stop=stop, mesh=mesh,
               do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               seed=args.seed, repetition_penalty=args.repetition_penalty)

    def question(q: str) -> str:
        if "<bbox" in q and not phrase:
            raise ValueError(f"{q!r} names a marker with <bbox>, but there is none: restart with --box, --point, ...")
        return q.replace("<bbox>", phrase) if phrase and "<bbox>" in q else q

    shown = set()

    def formatted(turns, counts) -> str:
        """The prompt for `turns` ([(question, answer or None)], counts: images per turn): --prompt-style's
        format, or the checkpoint's chat template on the same turns as messages (its warnings as notices)."""
        if style:
            return build_prompt(turns, counts, system=system, style=style)
        messages = [{"role": "system", "content": system}] if system is not None else []
        for (q, a), n in zip(turns, counts):
            messages.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": q}]})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            text = chat_prompt(proc, messages)
        for w in caught:  # the no-template fallback's warning, once
            if str(w.message) not in shown:
                shown.add(str(w.message))
                _notice(f"warning: {w.message}")
        return text

    if encoded is not None:  # --messages: one conversation, already encoded with its images
        for piece in generate_text_stream(module, params, proc, encoded, chunk_size=10**9 if args.no_stream else 8,
                                          **gen):
            if is_main_process():
                print(piece, end="", flush=True)
        if is_main_process():
            print(flush=True)
        return 0

    if args.prompt and len(args.prompt) > 1:  # a batch: same images for every prompt
        texts = [formatted([(question(q), None)], [len(images)]) for q in args.prompt]
        answers = generate_text(module, params, proc, texts, [images] * len(texts), **gen)
        if is_main_process():
            for q, answer in zip(args.prompt, answers):
                print(f"### {q}\n{answer}\n")
        return 0

    def prompt_for(turns):  # the images always go with the oldest turn kept
        return formatted(turns, [len(images)] + [0] * (len(turns) - 1))

    turns: list[tuple[str, str | None]] = []
    first = args.prompt[0] if args.prompt else None
    while True:
        q = first if first is not None else _read_question()
        first = None
        if q is None:
            return 0
        if args.chat and q == "/reset":
            turns.clear()
            _notice("[conversation reset: the next question starts over with the same image(s)]")
            continue
        try:
            turns.append((question(q), None))
            text = _fit_chat(turns, prompt_for, proc, images, module.config.text.max_position_embeddings,
                             args.max_new_tokens) if args.chat else prompt_for(turns)
        except ValueError as e:
            if not args.chat:
                raise
            if turns and turns[-1][1] is None:  # the question is not kept; the conversation goes on
                turns.pop()
            _notice(f"error: {e}")
            continue
        answer = []
        for piece in generate_text_stream(module, params, proc, text, images,
                                          chunk_size=10**9 if args.no_stream else 8, **gen):
            answer.append(piece)
            if is_main_process():
                print(piece, end="", flush=True)
        if is_main_process():
            print(flush=True)
        turns[-1] = (turns[-1][0], "".join(answer).strip())
        if not args.chat:
            return 0


def _encode_messages(proc: Processor, path) -> dict:
    """--messages FILE.json (a JSON list of HF chat messages, or an object with a "messages" list, as an OpenAI
    request body) -> the model inputs through the checkpoint's template, images loaded and visual prompts
    drawn (`Processor.apply_chat_template`); any problem is a ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--messages {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--messages {path}: cannot read it as JSON ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"--messages {path}: expected a JSON list of messages [{{\"role\": \"user\", \"content\": "
                         f"[...]}}, ...] (or {{\"messages\": [...]}}), got {json.dumps(data)[:80]}")
    if messages[-1].get("role") == "assistant":
        raise ValueError(f"--messages {path}: the conversation ends with an assistant message; end it with the "
                         "user's question, which is answered")
    try:
        return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ValueError(f"--messages {path}: {e}") from e


def _notice(line: str) -> None:
    if is_main_process():
        print(line, file=sys.stderr, flush=True)


def _fit_chat(turns: list, prompt_for, proc, images, context: int, max_new_tokens: int | None) -> str:
    """The chat prompt for `turns` (the last one unanswered), made to fit the model's context: while it leaves
    less room than wanted (--max-new-tokens, or by default min(256, context / 4)), the oldest turn is dropped
    (the images and the system prompt stay; one notice line says so). A question that does not fit even alone
    is a ValueError (the session reports it and goes on)."""
    want = max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max(1, context // 4))
    dropped = 0
    while True:
        text = prompt_for(turns)
        n = int(proc([text], images, max_length=sys.maxsize)["attention_mask"].sum())
        if len(turns) == 1:
            need = max_new_tokens or 1  # the default is lowered to what fits, as outside the chat
            if context - n < need:
                raise ValueError(f"the question does not fit: the prompt is {n} tokens and the model's context "
                                 f"{context}, leaving room for {max(0, context - n)} new token(s) where {need} "
                                 f"are wanted; ask a shorter question")
            break
        if context - n >= want:
            break
        del turns[0]
        dropped += 1
    if dropped:
        _notice(f"[context full: the oldest {dropped} turn(s) dropped ({n} of {context} tokens now used); the "
                f"image(s) and the system prompt stay; /reset starts over]")
    return text


def check_text(s: str, what: str) -> str:
    """Text from the command line: bytes that are not UTF-8 arrive as lone surrogates (Python's
    surrogateescape); refuse them with one line rather than fail deep inside the tokenizer."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = s[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8 (byte(s) {raw.hex(' ')} at character {e.start}); "
                         f"re-encode it as UTF-8") from None
    return s


def _read_question() -> str | None:
    """One line from stdin. Bytes that are not UTF-8 are replaced (U+FFFD), and a notice says so, rather than
    ending the conversation."""
    if sys.stdin.isatty():
        print("\nyou> ", end="", flush=True)
    buf = getattr(sys.stdin, "buffer", None)
    raw = buf.readline() if buf is not None else sys.stdin.readline().encode("utf-8", "surrogateescape")
    if not raw:
        return None
    try:
        q = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        q = raw.decode("utf-8", errors="replace")
        print(f"[warning: the question was not valid UTF-8 (byte 0x{raw[e.start]:02x} at {e.start}); undecodable "
              f"bytes replaced with \ufffd]", file=sys.stderr)
    q = q.strip()
    return None if q.lower() in ("", "exit", "quit") else q
