"""`vipllava_jax.pipeline`: HF's image-text-to-text pipeline over our processor and `generate_text`, on the tiny
random checkpoint (llava-hf's template: `###Human: <image>\\n...###Assistant:`, stop at `###`).

The answers are checked against `generate_text` on the prompt transformers' own processor renders for the same
messages, and the record shapes against what transformers' `ImageTextToTextPipeline` returns (transformers 5:
checked by hand, written down here). Every prompt has the same length bucket and the batches are of 1 and 2, so
the module compiles two prefills and two decode loops."""
import copy

import numpy as np
import pytest
from PIL import Image

import vipllava_jax
from vipllava_jax.data import Processor
from vipllava_jax.generation import ImageTextToTextPipeline, chat_prompt, chat_stop_strings, generate_text

NEW = 6


@pytest.fixture(scope="module")
def pipe(tiny_model, tiny_hf):
    module, params = tiny_model
    return ImageTextToTextPipeline(module, params, Processor.from_pretrained(tiny_hf), model_dir=tiny_hf)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((36, 48, 3)) * 255).astype(np.uint8)),
            Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8))]


def conversation(image, question, system=None):
    sys = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    return sys + [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def test_messages_answer_is_generate_text_on_transformers_prompt(pipe, tiny_hf, tiny_model, images):
    """The pipeline's greedy answer equals `generate_text` on the prompt transformers' processor renders; with
    return_full_text (the default) the messages come back with the answer appended, as HF returns them."""
    from transformers import AutoProcessor
    conv = conversation(images[0], "What is it?")
    given = copy.deepcopy(conv)
    prompt = AutoProcessor.from_pretrained(tiny_hf).apply_chat_template(conv, add_generation_prompt=True,
                                                                         tokenize=False)
    assert prompt == "###Human: <image>\nWhat is it?###Assistant:"
    want = generate_text(*tiny_model, pipe.processor, [prompt], [images[0]], max_new_tokens=NEW)[0]
    assert want  # the random model says something

    out = pipe(text=conv, max_new_tokens=NEW)
    assert out == [{"input_text": conv, "generated_text": conv + [{"role": "assistant", "content": want}]}]
    assert conv == given and out[0]["input_text"] is conv  # the caller's messages, not modified
    assert pipe(conv, max_new_tokens=NEW, return_full_text=False) == [{"input_text": conv, "generated_text": want}]
    assert pipe.stop == ("###",) == chat_stop_strings(pipe.processor)
    assert chat_prompt(pipe.processor, conv) == prompt


def test_batch_of_two_equals_each_alone_in_hf_shapes(pipe, images):
    """A list of conversations is one batch of 2 whose rows equal each conversation alone, returned as HF does
    ([[record], [record]]); the same prompts as strings with their images give the same answers as a flat list,
    the full text being the prompt and the answer."""
    a, b = conversation(images[0], "What is it?"), conversation(images[1], "Who is he?")
    alone = [pipe(text=c, max_new_tokens=NEW, return_full_text=False)[0]["generated_text"] for c in (a, b)]
    batch = pipe(text=[a, b], max_new_tokens=NEW, return_full_text=False)
    assert batch == [[{"input_text": a, "generated_text": alone[0]}], [{"input_text": b, "generated_text": alone[1]}]]

    prompts = [chat_prompt(pipe.processor, c) for c in (a, b)]
    flat = pipe(images=images, text=prompts, max_new_tokens=NEW)
    assert flat == [{"input_text": p, "generated_text": f"{p} {ans}" if ans else p} for p, ans in zip(prompts, alone)]
    assert pipe(images=images[:1], text=prompts[0], max_new_tokens=NEW, return_full_text=False) == \
        [{"input_text": prompts[0], "generated_text": alone[0]}]


def test_stream_pieces_join_to_the_answer(pipe, images):
    conv = conversation(images[0], "What is it?")
    answer = pipe(text=conv, max_new_tokens=NEW, return_full_text=False)[0]["generated_text"]
    pieces = list(pipe.stream(text=conv, max_new_tokens=NEW, chunk_size=2))
    assert len(pieces) > 1 and "".join(pieces).strip() == answer
    prompt = chat_prompt(pipe.processor, conv)
    assert "".join(pipe.stream(images=images[0], text=prompt, max_new_tokens=NEW)).strip() == answer


def test_sampling_options_are_seeded(pipe, images):
    conv = conversation(images[0], "What is it?")
    kw = dict(max_new_tokens=NEW, return_full_text=False, do_sample=True, temperature=5.0, top_k=50, top_p=0.99)
    one = pipe(text=conv, seed=1, **kw)
    assert pipe(text=conv, generate_kwargs={"seed": 1}, **kw) == one
    assert any(pipe(text=conv, seed=s, **kw) != one for s in (2, 3, 4))


def test_bad_input_is_a_clear_error(pipe, images):
    conv = conversation(images[0], "What is it?")
    with pytest.raises(ValueError, match="Give text="):
        pipe()
    with pytest.raises(ValueError, match=r"Give text=.*images alone are not a question"):
        pipe(images=images[0])
    with pytest.raises(ValueError, match="text= is an empty list"):
        pipe(text=[])
    with pytest.raises(ValueError, match="chat messages and images= given separately"):
        pipe(images=images[0], text=conv)
    with pytest.raises(ValueError, match=r"The prompt\(s\) have 0 <image> placeholder\(s\) \(per prompt: \[0\]\) "
                                         r"but 1 image\(s\) were given: .*write <image> where each image goes"):
        pipe(images=images[0], text="What is it?")
    with pytest.raises(ValueError, match=r"have 2 <image> placeholder\(s\) \(per prompt: \[1, 1\]\) but 1 image"):
        pipe(images=images[0], text=["<image>a", "<image>b"])
    with pytest.raises(ValueError, match="ends with an assistant message: continuing it"):
        pipe(text=conv + [{"role": "assistant", "content": "It is"}])
    with pytest.raises(ValueError, match="conversation 1 must be a non-empty list"):
        pipe(text=[conv, []])
    with pytest.raises(ValueError, match="text= must be a prompt string"):
        pipe(text=[1, 2])
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['num_beams'\]"):
        pipe(text=conv, num_beams=2)
    with pytest.raises(ValueError, match="'max_new_tokens' is given twice"):
        pipe(text=conv, max_new_tokens=2, generate_kwargs={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="stream\\(\\) answers one input, got a batch of 2"):
        next(pipe.stream(text=[conv, conv]))
    with pytest.raises(ValueError, match="has no image: give 'image'"):
        pipe(text=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])


def test_pipeline_loads_a_directory(tiny_hf, tmp_path):
    p = vipllava_jax.pipeline("image-text-to-text", model=tiny_hf)
    assert isinstance(p, ImageTextToTextPipeline) and p.stop == ("###",) and p.model_dir == tiny_hf
    with pytest.raises(ValueError, match="runs the 'image-text-to-text' task, not 'text-generation'"):
        vipllava_jax.pipeline("text-generation", model=tiny_hf)
    with pytest.raises(ValueError, match="needs model="):
        vipllava_jax.pipeline()
    with pytest.raises(Exception, match="does not exist|not found|No such"):
        vipllava_jax.pipeline(model=tmp_path / "nope")
