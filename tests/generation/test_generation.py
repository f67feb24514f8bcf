"""Generation against HF `generate` on tiny random checkpoints (fp32), and the logits processors against HF's."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import vipllava_jax
from vipllava_jax import load_pretrained
from vipllava_jax.generation import (SamplingConfig, StopStrings, apply_repetition_penalty,
                                     apply_temperature, apply_top_k, apply_top_p, bucket_length, cut_at_stop,
                                     generate, generate_stream, generate_stream_tokens, generate_text,
                                     generate_text_stream, select_tokens, stop_strings_for)
from vipllava_jax.data import Processor, build_prompt
from vipllava_jax.testing import TINY_PAD_TOKEN, make_tiny_checkpoint
from vipllava_jax.testing import make_tiny_processor

from vipllava_jax.generation.loop import _compiled
from vipllava_jax.testing.parity import make_inputs

N = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gen")
    tm = make_tiny_checkpoint(d, seed=3)
    make_tiny_processor(d, image_seq_length=25, image_size=30)
    module, params = load_pretrained(d, progress=False)
    return d, tm, module, params


def batch(rng):
    """Row 0: two images, 62 tokens; row 1: one image and 9 left-pad tokens."""
    return make_inputs(rng, n_pad=9)


def hf_generate(tm, ids, pixels, mask, n=N, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("eos_token_id", 2)
    with torch.no_grad():
        out = tm.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                          attention_mask=torch.tensor(mask), max_new_tokens=n, pad_token_id=TINY_PAD_TOKEN,
                          **kw)[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=TINY_PAD_TOKEN)  # HF stops early


def test_greedy_batch_equals_hf_and_rows_alone(tiny):
    _, tm, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(0))
    ours = generate(module, params, ids, pixels, mask, max_new_tokens=N)
    assert ours.shape == (2, N) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_generate(tm, ids, pixels, mask))
    # each row of the batch equals that row alone (without its padding)
    np.testing.assert_array_equal(generate(module, params, ids[:1], pixels[:2], mask[:1], max_new_tokens=N),
                                  ours[:1])
    alone = generate(module, params, ids[1:, 9:], pixels[2:], mask[1:, 9:], max_new_tokens=N)
    np.testing.assert_array_equal(alone, ours[1:])
    np.testing.assert_array_equal(alone, hf_generate(tm, ids[1:, 9:], pixels[2:], mask[1:, 9:]))


def test_eos_stops_row_and_pads(tiny):
    """Pick as EOS a token greedy decoding produces mid-way: that row stops there, the rest is padding."""
    _, tm, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(1))
    free = generate(module, params, ids, pixels, mask, max_new_tokens=N, eos_token_id=[])
    row = 1 if len(set(free[1, :4].tolist())) > 1 else 0
    eos = int(free[row, 2]) if free[row, 2] not in free[row, :2] else int(free[row, 1])
    ours = generate(module, params, ids, pixels, mask, max_new_tokens=N, eos_token_id=eos)
    ref = hf_generate(tm, ids, pixels, mask, eos_token_id=eos)
    np.testing.assert_array_equal(ours, ref)
    k = int(np.argmax(ours[row] == eos))
    assert (ours[row, k + 1:] == TINY_PAD_TOKEN).all() and k + 1 < N


def test_single_prompt_from_processor(tiny):
    """Real inputs: the tiny tokenizer, the llava_v0 prompt, one image through our processor."""
    d, tm, module, params = tiny
    proc = Processor.from_pretrained(d)
    img = (np.random.default_rng(2).random((40, 52, 3)) * 255).astype(np.uint8)
    enc = proc([build_prompt("What is in the red box?", system="")], [img])
    ours = generate(module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=N)
    np.testing.assert_array_equal(ours, hf_generate(tm, enc["input_ids"], enc["pixel_values"],
                                                    enc["attention_mask"]))


def test_scanned_params_generate_the_same(tiny):
    d, _, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(0))
    smod, sparams = load_pretrained(d, scan_layers=True, progress=False)
    np.testing.assert_array_equal(generate(smod, sparams, ids, pixels, mask, max_new_tokens=4),
                                  generate(module, params, ids, pixels, mask, max_new_tokens=4))


def test_repetition_penalty_greedy_equals_hf(tiny):
    _, tm, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(4))
    ids, pixels, mask = ids[:1], pixels[:2], mask[:1]  # HF also penalises left-pad tokens; we do not
    ours = generate(module, params, ids, pixels, mask, max_new_tokens=N, repetition_penalty=1.8)
    np.testing.assert_array_equal(ours, hf_generate(tm, ids, pixels, mask, repetition_penalty=1.8))
    assert not np.array_equal(ours, generate(module, params, ids, pixels, mask, max_new_tokens=N))


def test_sampling_seeded_and_top_k_1_is_greedy(tiny):
    _, _, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(5))
    kw = dict(max_new_tokens=N, do_sample=True, temperature=5.0)
    a = generate(module, params, ids, pixels, mask, seed=7, **kw)
    np.testing.assert_array_equal(a, generate(module, params, ids, pixels, mask, seed=7, **kw))
    assert not np.array_equal(a, generate(module, params, ids, pixels, mask, seed=8, **kw))
    np.testing.assert_array_equal(
        generate(module, params, ids, pixels, mask, max_new_tokens=N, do_sample=True, top_k=1, seed=3),
        generate(module, params, ids, pixels, mask, max_new_tokens=N))


def test_public_api_entry_point(tiny):
    _, _, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(0))
    out = vipllava_jax.generate(module, params, ids, pixels, mask, max_new_tokens=3, do_sample=False,
                                temperature=1.0, top_k=None, top_p=None, seed=0)
    assert out.shape == (2, 3)


# --- logits processors vs HF ------------------------------------------------------------------------------------
def _hf(proc, logits, ids=None):
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if ids is None else torch.tensor(ids)
    return proc(ids, torch.tensor(logits)).numpy()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_equals_hf(p):
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32) * 3
    ours = np.asarray(apply_top_p(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(_hf(TopPLogitsWarper(p), logits)))
    np.testing.assert_array_equal(ours[~np.isinf(ours)], logits[~np.isinf(ours)])


@pytest.mark.parametrize("k", [1, 5, 50, 1000])
def test_top_k_equals_hf(k):
    from transformers.generation.logits_process import TopKLogitsWarper
    logits = np.random.default_rng(1).standard_normal((3, 200)).astype(np.float32)
    logits[0, :10] = 2.5  # ties at the cut are kept by both
    np.testing.assert_array_equal(np.asarray(apply_top_k(jnp.asarray(logits), k)),
                                  _hf(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature_equals_hf(t):
    from transformers.generation.logits_process import TemperatureLogitsWarper
    logits = np.random.default_rng(2).standard_normal((2, 50)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(apply_temperature(jnp.asarray(logits), t)),
                               _hf(TemperatureLogitsWarper(t), logits), rtol=1e-6)


def test_repetition_penalty_equals_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 40)).astype(np.float32)
    ids = rng.integers(0, 40, (2, 12))
    seen = np.zeros((2, 40), bool)
    seen[np.arange(2)[:, None], ids] = True
    np.testing.assert_allclose(np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)),
                               _hf(RepetitionPenaltyLogitsProcessor(1.3), logits, ids), rtol=1e-6)


def test_sampling_follows_the_processed_distribution():
    """Empirical frequencies of select_tokens match softmax of HF's processed logits (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = np.random.default_rng(4).standard_normal((1, 12)).astype(np.float32) * 2
    sc = SamplingConfig(do_sample=True, temperature=0.7, top_k=8, top_p=0.8)
    ref = logits
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.8)):
        ref = _hf(proc, ref)
    want = np.exp(ref[0] - ref[0].max())
    want /= want.sum()
    keys = jax.random.split(jax.random.key(0), 20000)
    toks = jax.vmap(lambda k: select_tokens(jnp.asarray(logits), None, k, sc))(keys)[:, 0]
    freq = np.bincount(np.asarray(toks), minlength=12) / len(keys)
    assert (freq[want == 0] == 0).all()
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)


# --- stop strings, streaming, buckets -------------------------------------------------------------------------
def test_stop_automaton_matches_substring_search():
    """After any token sequence, hit == the stop string ends inside the newest token's text."""
    texts = ["", "#", "##", "a#", "###x", "b", "#a##", "x##", "ab"]
    rng = np.random.default_rng(0)
    for stop in ("###", "a#a", "ab#"):
        tab = StopStrings.build([stop], texts)
        for _ in range(300):
            seq = rng.integers(0, len(texts), 8)
            state, text = 0, ""
            for tid in seq:
                before = len(text)
                text += texts[tid]
                hit = tab.hit[0, state, tid]
                state = tab.next_state[0, state, tid]
                ends_inside = any(text.startswith(stop, i) and i + len(stop) > before
                                  for i in range(max(0, before - len(stop) + 1), len(text) - len(stop) + 1))
                assert hit == ends_inside, (stop, [texts[i] for i in seq])


def test_stop_string_equals_hf_stop_strings(tiny):
    """A stop string the model will produce (taken from its own greedy output) ends rows as HF's does."""
    from transformers import AutoTokenizer
    d, tm, module, params = tiny
    tok = AutoTokenizer.from_pretrained(d)
    ids, pixels, mask = batch(np.random.default_rng(0))
    free = generate(module, params, ids, pixels, mask, max_new_tokens=N, eos_token_id=[])
    text = tok.decode(free[0, 2:5].tolist())
    stop = text[1:] if len(text) > 2 else text
    tables = stop_strings_for(tok, [stop], module.config.text.vocab_size)
    ours = generate(module, params, ids, pixels, mask, max_new_tokens=N, stop_strings=tables)
    ref = hf_generate(tm, ids, pixels, mask, stop_strings=[stop], tokenizer=tok)
    np.testing.assert_array_equal(ours, ref)
    assert (ours[0] == TINY_PAD_TOKEN).any()


def test_stream_tokens_and_text(tiny):
    from transformers import AutoTokenizer
    d, _, module, params = tiny
    tok = AutoTokenizer.from_pretrained(d)
    ids, pixels, mask = batch(np.random.default_rng(0))
    full = generate(module, params, ids, pixels, mask, max_new_tokens=N)
    chunks = list(generate_stream_tokens(module, params, ids, pixels, mask, max_new_tokens=N, chunk_size=3))
    assert len(chunks) > 2
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), full)
    one = (ids[:1], pixels[:2], mask[:1])
    pieces = list(generate_stream(module, params, *one, tokenizer=tok, max_new_tokens=N, stop=(), chunk_size=2))
    assert len(pieces) > 1
    assert "".join(pieces) == tok.decode(full[0].tolist(), skip_special_tokens=True)
    # with a stop string: the text ends just before it
    text = "".join(pieces)
    stop = text[3:5]
    streamed = "".join(generate_stream(module, params, *one, tokenizer=tok, max_new_tokens=N, stop=(stop,)))
    assert streamed == text[:text.find(stop)]


def test_cut_at_stop_keeps_the_text_before_the_earliest_stop_string():
    assert cut_at_stop("a b###c</s>d###", ("</s>", "###")) == "a b"
    assert cut_at_stop("a b</s>c###", ("###", "</s>")) == "a b"
    assert cut_at_stop(" a b ", ("###",)) == " a b "  # no stop string: all of it, unstripped
    assert cut_at_stop("a b", ()) == "a b"


def test_generate_text_is_generate_decoded_and_cut(tiny):
    """Prompts -> processor -> generate (the processor's pad / EOS, stop strings on the device) -> decode -> cut:
    the same answers as those steps by hand, and the streamed answer of one prompt is the same text."""
    d, _, module, params = tiny
    proc = Processor.from_pretrained(d)
    img = (np.random.default_rng(2).random((40, 52, 3)) * 255).astype(np.uint8)
    prompts = [build_prompt(q, system="") for q in ("What is in the red box?", "Which colour?")]
    enc = proc(prompts, [img, img])
    full = generate(module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=N)
    texts = [proc.decode(row) for row in full]
    stop = (texts[0][3:5], texts[1][6:8])  # strings the model produces: every row stops early
    answers = generate_text(module, params, proc, prompts, [img, img], max_new_tokens=N, stop=stop)
    assert answers == [min((t[:t.find(s)] for s in stop if s in t), key=len).strip() for t in texts]
    assert "".join(generate_text_stream(module, params, proc, prompts[0], [img], max_new_tokens=N, stop=stop,
                                        chunk_size=2)).rstrip() == answers[0]
    # fit_context: a cap lowered to the room left in the context rather than refused
    room = module.config.text.max_position_embeddings - int(enc["attention_mask"].sum(-1).max())
    with pytest.raises(ValueError, match="does not fit"):
        generate_text(module, params, proc, prompts, [img, img], max_new_tokens=room + 1)
    capped = generate_text(module, params, proc, prompts, [img, img], max_new_tokens=room + 1, fit_context=True,
                           stop=())
    assert capped == [proc.decode(row).strip() for row in generate(
        module, params, enc["input_ids"], enc["pixel_values"], enc["attention_mask"], max_new_tokens=room)]


def test_prompt_buckets_share_one_compile(tiny):
    _, _, module, params = tiny
    assert [bucket_length(t) for t in (1, 16, 17, 33, 600, 616)] == [16, 16, 20, 40, 640, 640]
    ids, pixels, mask = batch(np.random.default_rng(0))
    row = (ids[1:, 9:], pixels[2:], mask[1:, 9:])  # 53 tokens, no padding
    generate(module, params, *row, max_new_tokens=5)
    before = _compiled.cache_info()
    short = generate(module, params, row[0][:, 3:], row[1], row[2][:, 3:], max_new_tokens=5)  # 50 tokens
    after = _compiled.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    np.testing.assert_array_equal(
        short, generate(module, params, row[0][:, 3:], row[1], row[2][:, 3:], max_new_tokens=5, bucket=False))
    # max_new_tokens is bucketed too: 7 reuses the compile for 5, and its first 5 tokens are the same
    before = _compiled.cache_info()
    longer = generate(module, params, row[0][:, 3:], row[1], row[2][:, 3:], max_new_tokens=7)
    assert _compiled.cache_info().misses == before.misses
    assert longer.shape == (1, 7)
    np.testing.assert_array_equal(longer[:, :5], short)


def test_bad_inputs(tiny):
    _, _, module, params = tiny
    ids, pixels, mask = batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        generate(module, params, ids, pixels[:2], mask, max_new_tokens=2)
    right = mask[1:, ::-1].copy()
    with pytest.raises(ValueError, match="left padding"):
        generate(module, params, ids[1:], pixels[2:], right, max_new_tokens=2)
    long_ids = np.full((1, 300), 5)
    with pytest.raises(ValueError, match="longer than the model's context of 256"):
        generate(module, params, long_ids, None, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(module, params, ids, pixels, mask[:, 1:], max_new_tokens=2)


def test_one_generation_config_for_generate_and_the_streams():
    """GenerationConfig's fields are generate's keyword arguments (names and defaults), so the CLI and the
    stream forms pass one config; the stream forms take the same keywords."""
    import dataclasses
    import inspect
    from vipllava_jax.generation import GenerationConfig
    sig = inspect.signature(generate).parameters
    for f in dataclasses.fields(GenerationConfig):
        assert f.name in sig and sig[f.name].default == f.default, f.name
    assert set(GenerationConfig().kwargs()) == {f.name for f in dataclasses.fields(GenerationConfig)}
    with pytest.raises(TypeError):
        next(generate_stream_tokens(None, None, np.zeros((1, 4), np.int32), no_such_setting=1))
