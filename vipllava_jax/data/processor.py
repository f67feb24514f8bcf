"""Images and text -> VipLlava model inputs, exactly as Hugging Face's processor makes them (numpy, no torch).

VipLlava checkpoints (llava-hf/vip-llava-7b-hf, -13b-hf) use transformers' `LlavaProcessor`: a
`CLIPImageProcessor` plus the checkpoint's Llama tokenizer, with every `<image>` in the text expanded to one
`<image>` token per image feature (576 for the real checkpoints). This package reproduces it (`images.py`,
`clip.py`, `prompts.py`, and the `Processor` here):

- `load_image(src)`: a path, URL, `data:` URI, bytes, PIL image or numpy array -> an RGB PIL image, converted
  the way HF converts that kind of input (see the function's docstring).
- `preprocess_image(image, config)`: resize the shortest side (bicubic, through PIL like HF's PIL backend),
  centre-crop, rescale by 1/255, normalise with the CLIP mean/std -> [3, H, W] float32, bit-for-bit what
  `CLIPImageProcessor` gives. `pad_to_square=True` pads with the CLIP mean colour first, as the original
  ViP-LLaVA training did (not what HF does).
- `build_prompt(turns)`: the llava_v0 chat format the HF checkpoints expect
  (`<system>###Human: <image>\\n{prompt}###Assistant:`), multi-turn too.
- `Processor.from_pretrained(model_dir)(texts, images)`: numpy `input_ids` / `attention_mask` (int32, left
  padded) and `pixel_values` [num_images, 3, H, W] float32, with ids equal to
  `AutoProcessor.from_pretrained(model_dir)(text=..., images=..., padding=True)` with left padding.
- `Processor.apply_chat_template(messages, ...)`: HF-style chat messages -> the prompt (the checkpoint's own
  jinja template, rendered as transformers renders it) or, with `tokenize=True`, the model inputs; see
  `chat.py` for the message form, image parts and visual prompts.

The image parity target is the processor `AutoProcessor` builds. In transformers 5 that is the torchvision
("fast") `CLIPImageProcessor` when torchvision is installed and the PIL backend (`CLIPImageProcessorPil`)
otherwise; this module matches the PIL one (to the bit). The torchvision backend resizes with torchvision's
bicubic kernel, not PIL's, so its pixels can differ slightly from both (not measured here: torchvision is
not installed).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import chat
from . import visual_prompts as vp
from .clip import PROCESSOR_CONFIG, ImageConfig, preprocess_images, read_json
from .prompts import IMAGE_TOKEN, VIPLLAVA_CHAT_TEMPLATE

__all__ = ["Processor"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the vocabulary: one of these must exist


def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(_flatten_images(im) if isinstance(im, (list, tuple)) else [im])
        return out
    return [images]


class Processor:
    """Texts + images -> VipLlava inputs, like HF's `LlavaProcessor` with left padding, in numpy.

    Build it with `Processor.from_pretrained(model_dir)`. Calling it returns a dict with
    `input_ids` [B, L] int32, `attention_mask` [B, L] int32 (left padded with the tokenizer's pad id) and,
    when images are given, `pixel_values` [num_images, 3, H, W] float32 in the order the `<image>`
    placeholders appear across the texts.
    """

    def __init__(self, tokenizer, image_config: ImageConfig | None = None, *, image_seq_length: int | None = None,
                 patch_size: int | None = None, num_additional_image_tokens: int = 0,
                 vision_feature_select_strategy: str | None = None, image_token: str = IMAGE_TOKEN,
                 max_length: int | None = None, pad_to_square: bool = False,
                 chat_template: str | dict[str, str] | None = None):
        """image_seq_length: fixed image tokens per image; or give patch_size (+ num_additional_image_tokens,
        vision_feature_select_strategy) to count them like HF from the pixel size:
        (H // p) * (W // p) + num_additional_image_tokens - (1 if strategy == "default")."""
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer does not have {self.image_token!r} as a single token "
                             f"(it encodes to {ids})")
        self.image_token_id = ids[0]
        if patch_size is None and image_seq_length is None:
            raise ValueError("give image_seq_length or patch_size")
        self._fixed_seq_length = image_seq_length
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.chat_template = chat_template  # a template string, {name: template}, or None (see apply_chat_template)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir, *, max_length: int | None = None, pad_to_square: bool = False,
                        image_seq_length: int | None = None) -> "Processor":
        """Load the checkpoint's own tokenizer (`AutoTokenizer`, local files only) and image settings.

        Image tokens per image: as HF, from processor_config.json's patch_size, num_additional_image_tokens
        and vision_feature_select_strategy; without those, config.json's image_seq_length (or
        (image_size // patch_size)**2 of its vision_config); `image_seq_length=` overrides both. The count is
        checked against config.json's vision tower when it is there.
        max_length: longest allowed prompt in tokens; None = config.json's max_position_embeddings, if any.
        The chat template is the checkpoint's own, found as transformers' processor finds it
        (`chat.read_chat_template`: processor_config.json, chat_template.json, chat_template.jinja, then
        tokenizer_config.json).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"Model directory not found: {model_dir}")
        present = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
        if not present:
            raise FileNotFoundError(
                f"No tokenizer files in {model_dir}: looked for {', '.join(TOKENIZER_FILES)} "
                "(and tokenizer_config.json)")
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - give the directory in the message
            raise ValueError(f"Cannot load the tokenizer in {model_dir} ({', '.join(present)}): {e}") from e

        image_config = ImageConfig.from_pretrained(model_dir)
        proc = read_json(model_dir / PROCESSOR_CONFIG) or {}
        cfg = read_json(model_dir / "config.json") or {}
        text_cfg = cfg.get("text_config") or {}
        vision_cfg = cfg.get("vision_config") or {}
        if max_length is None:
            max_length = text_cfg.get("max_position_embeddings")

        kw: dict[str, Any] = {}
        if image_seq_length is not None:
            kw["image_seq_length"] = int(image_seq_length)
        elif proc.get("patch_size"):
            kw.update(patch_size=int(proc["patch_size"]),
                      num_additional_image_tokens=int(proc.get("num_additional_image_tokens") or 0),
                      vision_feature_select_strategy=proc.get("vision_feature_select_strategy"))
        elif cfg.get("image_seq_length"):
            kw["image_seq_length"] = int(cfg["image_seq_length"])
        elif vision_cfg.get("image_size") and vision_cfg.get("patch_size"):
            kw["image_seq_length"] = (int(vision_cfg["image_size"]) // int(vision_cfg["patch_size"])) ** 2
        else:
            raise ValueError(f"Cannot tell how many tokens an image takes for {model_dir}: no patch_size in "
                             f"{PROCESSOR_CONFIG}, no image_seq_length or vision_config in config.json; pass "
                             "image_seq_length=")
        template, _ = chat.read_chat_template(model_dir)
        self = cls(tokenizer, image_config, image_token=proc.get("image_token") or IMAGE_TOKEN,
                   max_length=max_length, pad_to_square=pad_to_square, chat_template=template, **kw)

        # The model must see as many <image> tokens as its vision tower gives features.
        if vision_cfg.get("image_size") and vision_cfg.get("patch_size") and image_config.do_center_crop:
            n_model = (int(vision_cfg["image_size"]) // int(vision_cfg["patch_size"])) ** 2
            n_proc = self.image_seq_length
            if n_proc != n_model:
                raise ValueError(
                    f"{model_dir}: the processor gives {n_proc} <image> tokens per image but the vision tower "
                    f"({vision_cfg['image_size']} px, patch {vision_cfg['patch_size']}) gives {n_model} features")
        if cfg.get("image_token_index") is not None and int(cfg["image_token_index"]) != self.image_token_id:
            raise ValueError(f"{model_dir}: config.json's image_token_index is {cfg['image_token_index']} but the "
                             f"tokenizer maps {self.image_token!r} to {self.image_token_id}")
        return self

    # -- ids ---------------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for pixel values of this size (HF's LlavaProcessor.replace_image_token count)."""
        if self.patch_size is None:
            return self._fixed_seq_length
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    @property
    def image_seq_length(self) -> int | None:
        """Image tokens per image for the configured crop size (None when it depends on the input size)."""
        if self.patch_size is None:
            return self._fixed_seq_length
        if not self.image_config.do_center_crop:
            return None
        return self.num_image_tokens(self.image_config.crop_size["height"], self.image_config.crop_size["width"])

    # -- call ----------------------------------------------------------------------------------------------
    def preprocess_images(self, images, *, pad_to_square: bool | None = None) -> np.ndarray:
        pts = self.pad_to_square if pad_to_square is None else pad_to_square
        return preprocess_images(_flatten_images(images), self.image_config, pad_to_square=pts)

    def __call__(self, texts: str | Sequence[str], images=None, *, max_length: int | None = None,
                 pad_to_square: bool | None = None, add_special_tokens: bool = True) -> dict[str, np.ndarray]:
        """texts: one prompt or a batch; each `<image>` in them takes the next image.
        images: None, one image, or a list (nested lists per prompt are flattened), anything `load_image`
          takes. max_length / pad_to_square override the processor's settings for this call.
        add_special_tokens: False for texts that already start with the bos token (no second one).
        Raises ValueError when placeholders and images differ in number or a prompt is longer than max_length.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a non-empty list of strings")
        images = _flatten_images(images)
        per_text = [t.count(self.image_token) for t in texts]
        if sum(per_text) != len(images):
            raise ValueError(
                f"The text has {sum(per_text)} {self.image_token} placeholder(s) (per prompt: {per_text}) but "
                f"{len(images)} image(s) were given; they must match, one image per {self.image_token}")

        out: dict[str, np.ndarray] = {}
        replacements: list[str] = []
        if images:
            pixel_values = self.preprocess_images(images, pad_to_square=pad_to_square)
            out["pixel_values"] = pixel_values
            h, w = pixel_values.shape[-2:]
            replacements = [self.image_token * self.num_image_tokens(h, w)] * len(images)

        it = iter(replacements)
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            expanded.append(parts[0] + "".join(next(it) + p for p in parts[1:]))
        ids = self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]

        for i, (row, t) in enumerate(zip(ids, expanded)):
            want = t.count(self.image_token)
            got = sum(1 for x in row if x == self.image_token_id)
            if got != want:
                raise ValueError(f"prompt {i}: {want} image tokens in the text became {got} {self.image_token_id} "
                                 "ids: the tokenizer does not split the image token cleanly")
        limit = self.max_length if max_length is None else max_length
        if limit is not None:
            for i, row in enumerate(ids):
                if len(row) > limit:
                    n_img = sum(1 for x in row if x == self.image_token_id)
                    raise ValueError(f"Prompt {i} is too long: {len(row)} tokens ({n_img} of them image tokens) "
                                     f"but max_length is {limit}")

        longest = max(len(r) for r in ids)
        if any(len(r) != longest for r in ids) and self.pad_token_id is None:
            raise ValueError("The prompts have different lengths and the tokenizer has no pad token to pad them")
        input_ids = np.full((len(ids), longest), self.pad_token_id if self.pad_token_id is not None else 0, np.int32)
        attention_mask = np.zeros((len(ids), longest), np.int32)
        for i, row in enumerate(ids):
            if row:
                input_ids[i, longest - len(row):] = row
                attention_mask[i, longest - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    # -- chat messages ---------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, chat_template: str | None = None, **kwargs):
        """Chat messages -> the prompt string, or with `tokenize=True` the model inputs, like transformers'
        `ProcessorMixin.apply_chat_template` (see `chat.py` for the message form).

        messages: one conversation, a list of {"role", "content"} dicts (content a list of text / image parts,
          or a plain string: made one text part first), or a list of conversations (a batch).
        chat_template: a template string, or the name of one of the checkpoint's named templates; None: the
          checkpoint's own. A checkpoint without one gets llava-hf's VipLlava template (`###Human: ...`), with
          a warning.
        kwargs: template variables (`tools`, `documents`, anything the template reads), rendered with the
          tokenizer's special tokens (`bos_token`, `eos_token`, ...). For `tokenize=True` also
          `processor_kwargs={"max_length": ..., "pad_to_square": ...}` (or those two as keyword arguments the
          template does not read) and `return_tensors` (None or "np").

        Returns:
          tokenize=False: the prompt (a list of prompts for a batch).
          tokenize=True, return_dict=True: this processor's output for the prompt(s) and the images of the
            image parts in order (visual prompts drawn first): numpy `input_ids`, `attention_mask` [B, L] int32
            (left padded) and `pixel_values` [num_images, 3, H, W] float32, every `<image>` expanded.
          tokenize=True, return_dict=False: the input ids as HF returns them, a list of token-id lists (one per
            conversation, unpadded); with return_tensors="np" the padded [B, L] array.
        As HF, no second bos token is added to a prompt the template already starts with it.
        """
        for flag in ("continue_final_message", "return_assistant_tokens_mask", "sanitize_control_tokens"):
            if kwargs.pop(flag, False):
                raise NotImplementedError(f"apply_chat_template: {flag} is not supported here")
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        return_tensors = kwargs.pop("return_tensors", None)
        if return_tensors not in (None, "auto", "np"):
            raise ValueError(f"return_tensors must be None or 'np' (numpy), got {return_tensors!r}")
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})

        template = chat.select_template(self.chat_template, chat_template)
        if template is None:
            warnings.warn("This checkpoint has no chat template (chat_template.jinja, chat_template.json, or a "
                          "chat_template key in processor_config.json / tokenizer_config.json): using llava-hf's "
                          "VipLlava template ('###Human: <image>\\n...###Assistant:'); pass chat_template= to "
                          "choose another", UserWarning, stacklevel=2)
            template = VIPLLAVA_CHAT_TEMPLATE
        used = chat.template_variables(template)
        for k in ("max_length", "pad_to_square"):
            if k in kwargs and k not in used:
                processor_kwargs[k] = kwargs.pop(k)
        unknown = set(processor_kwargs) - {"max_length", "pad_to_square"}
        if unknown:
            raise ValueError(f"processor_kwargs takes max_length and pad_to_square, not {sorted(unknown)}")

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts (or a "
                             "list of such lists, a batch)")
        batched = isinstance(messages[0], (list, tuple))
        convs = [chat.normalize_conversation(c) for c in (messages if batched else [messages])]
        parts = [chat.image_parts(c) for c in convs]
        markers = [chat.markers_of(p) for p in parts]
        for c, ms in zip(convs, markers):
            chat.apply_markers(c, [m for per_image in ms for m in per_image])
        variables = {**(getattr(self.tokenizer, "special_tokens_map", None) or {}), **kwargs}
        prompts = [chat.render(template, c, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, **variables) for c in convs]
        if not tokenize:
            return prompts if batched else prompts[0]

        pad = processor_kwargs.get("pad_to_square")
        pad = self.pad_to_square if pad is None else pad
        images = []
        for ps, ms in zip(parts, markers):
            for part, marks in zip(ps, ms):
                image = chat.load_part_image(part)
                if marks:  # drawn on the image as given, before any resize, as the CLI draws them
                    image = vp.draw_markers(image, marks, warn_crop=not pad,
                                            crop_size=self.image_config.crop_size["height"])
                images.append(image)
        bos = getattr(self.tokenizer, "bos_token", None)
        out = self(prompts, images or None, add_special_tokens=not (bos and prompts[0].startswith(bos)),
                   **processor_kwargs)
        if return_dict:
            return out
        if return_tensors == "np":
            return out["input_ids"]
        return [row[mask.astype(bool)].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"])]

    def decode(self, ids, skip_special_tokens: bool = True, **kw) -> str:
        """Token ids (list or 1-D array) -> text, via the checkpoint's tokenizer."""
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens, **kw)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kw) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kw) for row in ids]
