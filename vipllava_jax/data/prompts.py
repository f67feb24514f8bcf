"""The chat prompt VipLlava expects (`build_prompt`: llava_v0, the HF checkpoints' format, or llava_v1, the
original training's and ViP-Bench's), the pieces training reads off it (`template_parts`) and the stop strings of
generation in each template (`stop_for_template`); the chat templates (jinja, as transformers renders them):
`VIPLLAVA_CHAT_TEMPLATE`, llava-hf's, and `llava_chat_template(style, system)`, which renders exactly what
`build_prompt` builds.

The end of an assistant turn is ``</s>`` (the eos token) for v1, and for v0 the ``###`` separator (original
``conv_llava_v0``'s sep; `build_prompt` leaves it off the last answer, for generation, training puts it after
every answer so the model learns to stop there: stop generation on "###").
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

__all__ = ["DEFAULT_SYSTEM_PROMPT", "IMAGE_TOKEN", "TEMPLATES", "V0_SEPARATOR", "VIPLLAVA_CHAT_TEMPLATE",
           "TemplateParts", "build_prompt", "check_template", "llava_chat_template", "template_parts",
           "stop_for_template"]

TEMPLATES = ("llava_v1", "llava_v0")
V0_SEPARATOR = "###"  # conv_llava_v0's sep: the end of each v0 turn
IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# The chat template llava-hf ships with vip-llava-7b-hf / -13b-hf (the "llava_v0" conversation format, no system
# prompt unless a system message gives one). `Processor.apply_chat_template` falls back to it for a checkpoint
# without a template of its own.
VIPLLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '###Human: '}}"
    "{% else %}"
    "{{ '###' + message['role'].title() + ': '}}"
    "{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '###Assistant:' }}"
    "{% endif %}"
)


def build_prompt(turns: Sequence[tuple[str, str | None]] | str, num_images: int | Sequence[int] = 1, *,
                 system: str = DEFAULT_SYSTEM_PROMPT, style: str = "llava_v0") -> str:
    """The chat prompt VipLlava expects.

    turns: [(user_text, assistant_text_or_None), ...], oldest first; a plain string is one turn. Only the
      last answer may be None: then the prompt ends with the assistant cue for generation.
    num_images: `<image>\\n` placeholders put before the user text: an int for the first turn, or one count
      per turn.
    style:
      "llava_v0" (default; HF model card, HF chat template, original conv_llava_v0):
        `{system}###Human: <image>\\n{q1}###Assistant: {a1}###Human: {q2}###Assistant:`
        Equal to the llava-hf chat template's output (user turns `###Human: `, images first as `<image>\\n`,
        assistant turns `###Assistant: `, generation cue `###Assistant:`) with the system text put in front
        once. A final given answer is not followed by `###`, as in the HF template.
      "llava_v1" (original ViP-LLaVA training and ViP-Bench, conv_llava_v1):
        `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    """
    if isinstance(turns, str):
        turns = [(turns, None)]
    turns = [tuple(t) for t in turns]
    if not turns:
        raise ValueError("build_prompt needs at least one turn")
    for i, t in enumerate(turns):
        if len(t) != 2 or not isinstance(t[0], str):
            raise ValueError(f"turn {i} must be (user_text, answer_or_None), got {t!r}")
        if t[1] is None and i != len(turns) - 1:
            raise ValueError(f"turn {i} has no answer: only the last turn's answer may be None")
    counts = [num_images] + [0] * (len(turns) - 1) if isinstance(num_images, int) else list(num_images)
    if len(counts) != len(turns) or any(c < 0 for c in counts):
        raise ValueError(f"num_images must be an int or one non-negative count per turn, got {num_images!r}")
    if style == "llava_v0":
        out = [system]
        for (user, answer), n in zip(turns, counts):
            out.append("###Human: " + "<image>\n" * n + user)
            out.append("###Assistant:" if answer is None else "###Assistant: " + answer)
        return "".join(out)
    if style == "llava_v1":
        out = [system, " "]
        for (user, answer), n in zip(turns, counts):
            out.append("USER: " + "<image>\n" * n + user + " ")
            out.append("ASSISTANT:" if answer is None else "ASSISTANT: " + answer + "</s>")
        return "".join(out)
    raise ValueError(f"unknown prompt style {style!r}: use 'llava_v0' or 'llava_v1'")


def check_template(template: str) -> str:
    """`template` if it is one of TEMPLATES, else a ValueError naming them."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    return template


@dataclasses.dataclass(frozen=True)
class TemplateParts:
    system: str  # masked: the system text and what follows it before the first user tag
    user_tag: str  # "USER: " / "Human: "
    assistant_tag: str  # " ASSISTANT:" / "###Assistant:" (masked, part of the human turn)
    answer_prefix: str  # " ": the space before an answer belongs to the answer's first token
    end_of_turn: str  # "</s>" / "###" (kept)


def template_parts(template: str, system: str = DEFAULT_SYSTEM_PROMPT) -> TemplateParts:
    """The pieces of `template`, read off `build_prompt` (so the template text lives in one place)."""
    u0, a0, u1, a1 = "\x00U0\x00", "\x00A0\x00", "\x00U1\x00", "\x00A1\x00"
    s = build_prompt([(u0, a0), (u1, a1)], num_images=0, system=system, style=template)
    head, rest = s.split(u0)
    mid, rest = rest.split(a0)
    sep, rest = rest.split(u1)
    mid2, tail = rest.split(a1)
    eot = tail or V0_SEPARATOR  # build_prompt ends a v0 prompt's last answer without its "###"
    if mid != mid2 or not sep.startswith(eot) or not head.endswith(sep[len(eot):]):
        raise ValueError(f"template {template!r} does not have the expected shape: {s!r}")
    user_tag = sep[len(eot):]
    assistant_tag = mid.rstrip(" ")
    return TemplateParts(system=head[:len(head) - len(user_tag)], user_tag=user_tag, assistant_tag=assistant_tag,
                         answer_prefix=mid[len(assistant_tag):], end_of_turn=eot)


def stop_for_template(template: str) -> tuple[str, ...]:
    """The stop strings of generation in `template`: its end of turn, ("</s>",) for llava_v1, ("###",) for
    llava_v0."""
    return (template_parts(check_template(template)).end_of_turn,)


def _jinja_str(s: str) -> str:
    """`s` as a jinja string literal (jinja unescapes literals like Python's unicode-escape)."""
    return json.dumps(s, ensure_ascii=False)


# The pieces of each style as `build_prompt` writes them (head: what follows the system text).
_CHAT_PIECES = {
    "llava_v1": dict(head=" ", user="USER: ", assistant=" ASSISTANT: ", end="</s>", generation=" ASSISTANT:"),
    "llava_v0": dict(head="", user="###Human: ", assistant="###Assistant: ", end="", generation="###Assistant:"),
}


def llava_chat_template(style: str = "llava_v1", system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """A jinja chat template (for chat_template.jinja) that renders exactly what `build_prompt` builds.

    Rendered by transformers' (or this package's) `apply_chat_template`, a conversation of alternating user
    and assistant messages (HF form: content a list of {"type": "image"} / {"type": "text", "text": ...} parts,
    or a plain string) gives `build_prompt(turns, counts, system=system, style=style)`, with
    `add_generation_prompt=True` when the last answer is to be generated: each user message's image parts
    first as `<image>\\n`, then its text parts. A leading system message's text replaces `system`. Any other
    role, or a system message after the first message, raises an error.

    llava_v1: `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:`
    llava_v0: `{system}###Human: <image>\\n{q1}###Assistant: {a1}###Human: {q2}###Assistant:`
    """
    q = _CHAT_PIECES[check_template(style)]

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # jinja unescapes literals like Python

    texts = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
             "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}"
             "{% endfor %}{% endif %}")
    images = ("{% if message['content'] is not string %}"
              "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
              "{% endfor %}{% endif %}")
    return (
        "{% for message in messages %}"
        "{% if loop.first %}"
        "{% if message['role'] == 'system' %}" + texts + "{% else %}" + lit(system) + "{% endif %}"
        + lit(q["head"]) +
        "{% endif %}"
        "{% if message['role'] == 'user' %}" + lit(q["user"]) + images + texts +
        "{% elif message['role'] == 'assistant' %}" + lit(q["assistant"]) + texts + lit(q["end"]) +
        "{% elif not (loop.first and message['role'] == 'system') %}"
        "{{ raise_exception('This chat template takes the roles system (first message only), user and "
        "assistant, not ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + lit(q["generation"]) + "{% endif %}"
    )
