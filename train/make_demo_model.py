#!/usr/bin/env python
"""Build the demo model's random-init HF directory: a small VipLlava (CLIP tower + Llama decoder) with a small
word-level BPE tokenizer trained on the synthetic task's words.

    python train/make_demo_model.py OUT_DIR [--seed 0]

OUT_DIR gets config.json + model.safetensors (transformers' `VipLlavaForConditionalGeneration(config)`, HF's
own init, seeded), tokenizer.json / tokenizer_config.json, processor_config.json / preprocessor_config.json and
chat_template.jinja (the demo's llava_v1 prompt with no system text, `data.prompts.llava_chat_template`): what
`vipllava_jax.data.Processor.from_pretrained`, `vipllava_jax.load_pretrained` and transformers' `AutoProcessor` /
`VipLlavaForConditionalGeneration.from_pretrained` read. `vipllava-jax train
--stage all` then trains it from scratch (train/train_demo.py runs the whole recipe).

The model (`DEMO_MODEL`): 96 px images, 24 px patches (16 image tokens: the 4 x 4 grid that
`synthetic.DEMO_SCENE` places its shapes on, one shape within a patch); CLIP tower 128 wide x 3 layers (4 heads,
MLP 512, CLIP's init); projector on the concatenated last two tower layers (`vision_feature_layers` [-2, -1]);
Llama decoder 128 wide x 3 layers (4 heads of 32, MLP 384), vocabulary 384, initialised with std 0.08 (about
1/sqrt(width); HF's default 0.02 is meant for wide models).

The tokenizer (`build_tokenizer`): byte-free BPE over printable ASCII (every character is a token, so any
text encodes), with Llama-style Metaspace pre-tokenization ("▁" for a space, no prefix space added) and merges
trained with `tokenizers`' BpeTrainer on the synthetic task's text (questions with every marker phrase, the
shape-list question and its "(marked)" tag, the answers, the chat templates), so each of those words is one token and a question is ~20 tokens instead of
~80 characters. `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, `<image>`=4; `<s>` prepended, padding on the left.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The demo model. Sizes were chosen by measuring accuracy against training time on a 2-core CPU
# (see train/configs/demo.yaml).
DEMO_MODEL = dict(
    image_size=96, patch_size=24,
    vision_hidden=128, vision_layers=3, vision_heads=4, vision_mlp=512,
    vision_feature_layers=(-2, -1),
    text_hidden=128, text_layers=3, text_heads=4, text_kv_heads=4, text_mlp=384,
    vocab_size=384, max_position_embeddings=256,
    text_init_std=0.08,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
SPACE = "\u2581"  # "▁", SentencePiece's space


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer's merges are learned from: every synthetic question form (all templates, every marker
    phrase, every reference shape), the shape-list question and its marked tag, the answers and the chat-template
    words, each line as often as it is
    likely in training (question forms once per phrase; the fixed words many times)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vipllava_jax.data import synthetic as syn
    from vipllava_jax.data import visual_prompts as vp

    phrases = []
    for kind, (prep, noun) in vp.PHRASE_WORDS.items():
        for name in list(vp.NAMED_COLORS) + [None]:
            phrases.append(f"{prep} the {name + ' ' if name else ''}{noun}")
    lines = []
    refs = [f"{c} {s}" for c in syn.SHAPE_COLORS for s in syn.SHAPES]
    for key, templates in syn.QUESTION_TEMPLATES.items():
        for t in templates:
            for i, p in enumerate(phrases):
                q = t.replace("<bbox>", p)
                if "{ref}" in q:
                    q = q.replace("{ref}", refs[i % len(refs)])
                lines.append(q)
    lines += [f"the {r}" for r in refs] * 2
    # the shape-list turn of the training data: its question, and the marked shape's tag in its answer
    lines += [syn.LIST_QUESTION] * 20 + [f"{r} {syn.MARKED_TAG}, {r} {syn.MARKED_TAG}" for r in refs]
    answers = syn.answer_vocabulary()
    lines += [" ".join(answers)] * 20
    lines += ["USER: ASSISTANT: ###Human: ###Assistant: What is in the image? Describe the object."] * 50
    return lines


def build_tokenizer(vocab_size: int = DEMO_MODEL["vocab_size"]):
    """The demo's `tokenizers.Tokenizer` (see the module docstring); deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from vipllava_jax.testing.tiny_tokenizer import TINY_CHARS

    alphabet = [SPACE if c == " " else c for c in TINY_CHARS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet))
    # each line with a leading space, as words stand in a prompt (" shape" -> one token "▁shape"),
    # and right after "<image>\n", as the question's first word stands
    lines = tokenizer_corpus()
    tok.train_from_iterator([" " + ln for ln in lines] + ["\n" + ln for ln in lines], trainer=trainer)
    got = tok.get_vocab()
    for i, t in enumerate(SPECIAL_TOKENS):
        if got.get(t) != i:
            raise RuntimeError(f"special token {t!r} got id {got.get(t)}, expected {i}")
    missing = [c for c in alphabet if c not in got]
    if missing:
        raise RuntimeError(f"characters missing from the vocabulary: {missing!r}")
    if len(got) > vocab_size:
        raise RuntimeError(f"vocabulary of {len(got)} > {vocab_size}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    return tok


def write_processor(out_dir, *, image_size: int = DEMO_MODEL["image_size"],
                    patch_size: int = DEMO_MODEL["patch_size"], vocab_size: int = DEMO_MODEL["vocab_size"]) -> dict:
    """Write the tokenizer and processor files (as `vipllava_jax.testing.make_tiny_processor` does, with
    the demo's BPE tokenizer) and chat_template.jinja: the prompt format the demo trains with (llava_v1, no
    system prompt: train/configs/demo.yaml, `evals.demo.DEMO_TEMPLATE` / `DEMO_SYSTEM_PROMPT`). Returns the
    token ids."""
    from vipllava_jax.data.prompts import llava_chat_template
    from vipllava_jax.evals.demo import DEMO_SYSTEM_PROMPT, DEMO_TEMPLATE
    from vipllava_jax.testing.tiny_tokenizer import save_processor

    tok = build_tokenizer(vocab_size)
    save_processor(out_dir, tok, image_size=image_size, patch_size=patch_size,
                   model_max_length=DEMO_MODEL["max_position_embeddings"])
    (Path(out_dir) / "chat_template.jinja").write_text(llava_chat_template(DEMO_TEMPLATE, DEMO_SYSTEM_PROMPT),
                                                       encoding="utf-8")
    return {"image_token_id": IMAGE_ID, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID,
            "vocab_size": tok.get_vocab_size()}


def demo_hf_config(**overrides):
    """transformers' VipLlavaConfig of the demo model (`DEMO_MODEL`, with `overrides` of its keys)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig

    m = {**DEMO_MODEL, **overrides}
    unknown = set(overrides) - set(DEMO_MODEL)
    if unknown:
        raise ValueError(f"unknown demo model settings {sorted(unknown)}; known: {sorted(DEMO_MODEL)}")
    if m["image_size"] % m["patch_size"]:
        raise ValueError(f"image_size {m['image_size']} is not a multiple of patch_size {m['patch_size']}")
    vc = CLIPVisionConfig(hidden_size=m["vision_hidden"], intermediate_size=m["vision_mlp"],
                          num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                          image_size=m["image_size"], patch_size=m["patch_size"], projection_dim=m["vision_hidden"])
    tc = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["text_hidden"], intermediate_size=m["text_mlp"],
                     num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
                     num_key_value_heads=m["text_kv_heads"], max_position_embeddings=m["max_position_embeddings"],
                     rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                     eos_token_id=EOS_ID, initializer_range=m["text_init_std"])
    n_img = (m["image_size"] // m["patch_size"]) ** 2
    return VipLlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                          vision_feature_layers=list(m["vision_feature_layers"]), image_seq_length=n_img,
                          tie_word_embeddings=False)


def make_demo_model(out_dir, *, seed: int = 0, **overrides) -> Path:
    """Write the random-init demo model (HF directory) into out_dir; returns it. `overrides`: DEMO_MODEL keys."""
    import torch
    from transformers import VipLlavaForConditionalGeneration

    out_dir = Path(out_dir)
    config = demo_hf_config(**overrides)
    m = {**DEMO_MODEL, **overrides}
    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(out_dir), safe_serialization=True)
    ids = write_processor(out_dir, image_size=m["image_size"], patch_size=m["patch_size"],
                          vocab_size=m["vocab_size"])
    if ids["vocab_size"] > m["vocab_size"]:
        raise RuntimeError(f"tokenizer has {ids['vocab_size']} ids, more than the model's {m['vocab_size']}")
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory to write the random-init HF model into")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation")
    a = p.parse_args(argv)
    out = make_demo_model(a.out_dir, seed=a.seed)
    n = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({n / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
