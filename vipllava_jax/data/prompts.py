"""The chat prompt VipLlava expects (`build_prompt`: llava_v0, the HF checkpoints' format, or llava_v1, the
original training's and ViP-Bench's)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["DEFAULT_SYSTEM_PROMPT", "IMAGE_TOKEN", "build_prompt"]

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions.")


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
