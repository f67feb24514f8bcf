"""The continuous-batching engine (`generation.engine`) on the tiny checkpoint: greedy output of each request equals
`generate` for that request alone whatever runs beside it, requests join mid-decode and leave at once, no compile
after warm-up, QueueFull, over-long prompts, stop strings, and a failing request that fails only itself.

Cheap by design (the default suite is at its time limit): one engine (4 slots, 64-token rows, chunk 4, prompt
buckets 32 and 64) warmed up once per module; reference prompts keep to two of `generate`'s buckets."""
import collections
import functools
import math
import queue
import re
import threading
import time

import jax
import numpy as np
import pytest

from vipllava_jax.generation import generate, token_strings
from vipllava_jax.generation.engine import Engine, EngineStopped, QueueFull, RequestFailed
from vipllava_jax.parallel import make_mesh
from vipllava_jax.testing import TINY_IMAGE_TOKEN

# One worker runs the whole module: its warmed-up engine fixture (the costliest setup here) is built once.
pytestmark = pytest.mark.xdist_group("engine")
KW = dict(max_batch=4, max_model_len=64, chunk=4, prefill_buckets=(32, 64))
SEQ = 25  # image tokens per image (the tiny processor's)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def make_prompt(rng, n_text: int, image: bool):
    """BOS, then (with an image) its 25 image tokens, then random text; pixels [1, 3, 30, 30] or None."""
    text = rng.integers(3, 99, n_text).astype(np.int32)
    if not image:
        return np.concatenate([[1], text]).astype(np.int32), None
    ids = np.concatenate([[1], np.full(SEQ, TINY_IMAGE_TOKEN), text]).astype(np.int32)
    return ids, rng.standard_normal((1, 3, 30, 30)).astype(np.float32)


def reference(model, ids, pix, n):
    """`generate` for this prompt alone, greedy, without EOS (one `generate` setting: fewer compiles)."""
    module, params = model
    return generate(module, params, ids[None], pix, max_new_tokens=n, eos_token_id=[])[0].tolist()


def until_eos(tokens, eos):
    """`generate`'s row as the engine delivers it: up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_processor):
    """A started, warmed-up engine; `engine.compiles` counts the XLA compiles on the engine thread since then."""
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, **KW).start()
    assert eng.wait_ready(300) and eng.ready and eng.error is None
    counter = {"n": 0}

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE and threading.current_thread() is eng._thread:
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    eng.compiles, eng.programs = counter, eng.compile_count()
    yield eng
    jax.monitoring.unregister_event_duration_listener(listener)
    eng.stop(5)
    assert not eng._thread.is_alive()


def assert_no_compile(engine):
    assert engine.compiles["n"] == 0, "the engine compiled after warm-up"
    assert engine.compile_count() == engine.programs


def test_greedy_equals_generate_alone_with_staggered_requests(engine, tiny_model, tiny_processor):
    """8 requests of mixed length, image count and max_new_tokens, in three waves: each later wave is submitted
    from a running request's update callback (on the engine thread, between two chunks), so it joins while the
    earlier requests are mid-decode, whatever the machine's timing."""
    rng = np.random.default_rng(0)
    specs = [(5, False, 12), (2, True, 7), (11, False, 3), (1, True, 14), (8, False, 16), (2, True, 1),
             (13, False, 9), (1, True, 10)]  # (text tokens, image, max_new_tokens)
    prompts = [make_prompt(rng, n, img) for n, img, _ in specs]
    eos = (tiny_processor.eos_token_id,)
    waves, reqs, triggered = [(0, 3), (3, 6), (6, 8)], {}, []

    def submit_wave(w):
        for i in range(*waves[w]):
            (ids, pix), m = prompts[i], specs[i][2]
            reqs[i] = engine.submit(ids, pix, max_new_tokens=m, on_update=functools.partial(on_update, w))

    def on_update(w, req, new, finished):  # engine thread
        if not finished and w + 1 < len(waves) and len(triggered) == w:
            triggered.append(req.id)
            submit_wave(w + 1)

    submit_wave(0)
    t0 = time.monotonic()
    while len(reqs) < 8 and not all(r.done for r in reqs.values()):
        assert time.monotonic() - t0 < 120
        time.sleep(0.005)
    assert len(triggered) == 2, f"a wave's requests all ended at their first token: {triggered}"
    for i, ((ids, pix), (_, _, m)) in enumerate(zip(prompts, specs)):
        r = reqs[i]
        got = r.result(120)
        want = until_eos(reference(tiny_model, ids, pix, m), eos)
        assert got == want, f"request {r.id} ({len(ids)} prompt tokens, {m} new)"
        assert r.finish_reason == ("stop" if got[-1] in eos else "length")
        assert r.usage == {"prompt_tokens": len(ids), "completion_tokens": len(got),
                           "total_tokens": len(ids) + len(got)}
        assert r.first_token_at is not None and r.finished_at >= r.first_token_at
    assert_no_compile(engine)


def test_requests_queued_together_are_prefilled_in_one_call(engine, tiny_model, tiny_processor):
    """Four requests queued while the engine waits (its lock held) are admitted in one batched prefill: prompts of
    two length buckets and with and without an image, left padded to the longest; a max_new_tokens=1 request ends
    with its first token, before any decode chunk. Each answer equals `generate` for it alone."""
    rng = np.random.default_rng(7)
    specs = [(3, True, 6), (20, False, 1), (1, False, 9), (6, True, 4)]  # (text tokens, image, max_new_tokens)
    prompts = [make_prompt(rng, n, img) for n, img, _ in specs]
    before = engine.stats()
    with engine._cv:  # the engine thread cannot plan until all four are queued
        reqs = [engine.submit(ids, pix, max_new_tokens=m, eos_token_id=[]) for (ids, pix), (_, _, m) in
                zip(prompts, specs)]
    for r, (ids, pix), (_, _, m) in zip(reqs, prompts, specs):
        assert r.result(120) == reference(tiny_model, ids, pix, m), f"request {r.id}"
    after = engine.stats()
    assert after["admit_calls"] - before["admit_calls"] == 1 and after["admitted"] - before["admitted"] == 4
    assert after["chunks"] - before["chunks"] == 2  # the longest: its first token at admission, 8 more in 2 chunks
    assert_no_compile(engine)


def test_cancel_frees_the_slot_for_a_queued_request(engine, tiny_model):
    """All 4 slots busy with requests that fill their rows; a 5th waits. Cancelling one (from its first update)
    admits the 5th into that slot at the next chunk boundary, long before the others end."""
    rng = np.random.default_rng(1)
    prompts = [make_prompt(rng, 4 + i, False) for i in range(5)]
    cancel_me = threading.Event()

    def on_update(req, new, finished):
        if cancel_me.is_set():
            req.cancel()

    victim = engine.submit(prompts[0][0], on_update=on_update, eos_token_id=[])
    others = [engine.submit(ids, eos_token_id=[]) for ids, _ in prompts[1:4]]  # max_new_tokens: the whole row
    late = engine.submit(prompts[4][0], max_new_tokens=6, eos_token_id=[])
    while any(r.slot is None for r in others):  # all 4 slots taken, the 5th queued
        time.sleep(0.001)
    cancel_me.set()
    assert late.result(120) == reference(tiny_model, prompts[4][0], None, 6)
    assert victim.wait(60) and victim.finish_reason == "cancelled"
    assert 0 < victim.completion_tokens < 64 - len(prompts[0][0])
    assert late.slot == victim.slot
    assert all(r.finished_at is None or late.finished_at < r.finished_at for r in others)
    for r, (ids, _) in zip(others, prompts[1:4]):
        assert r.result(120)[:16] == reference(tiny_model, ids, None, 16)  # greedy: a prefix of the whole answer
        assert r.finish_reason == "length" and r.completion_tokens == 64 - len(ids)  # clamped to the row
    assert_no_compile(engine)


def test_eos_and_stop_strings_end_a_request(engine, tiny_model, tiny_processor):
    rng = np.random.default_rng(5)  # a prompt whose answer starts with text (the random model soon repeats 111)
    ids, pix = make_prompt(rng, 2, True)
    free = reference(tiny_model, ids, pix, 12)
    eos = free[3] if free[3] not in free[:3] else free[1]
    got = engine.submit(ids, pix, max_new_tokens=12, eos_token_id=eos).result(60)
    assert got == free[: free.index(eos) + 1]
    # stop string: two characters the answer produces; the request ends at the token that completes it
    strings = token_strings(tiny_processor.tokenizer, 128)
    j = next(j for j in range(11) if strings[free[j]] and strings[free[j + 1]])  # ids past 101 have no text
    stop = strings[free[j]] + strings[free[j + 1]]
    prompt_text = "".join(strings[t] for t in ids)
    end = next(j for j in range(12) if (prompt_text + "".join(strings[t] for t in free[: j + 1])).endswith(stop))
    r = engine.submit(ids, pix, max_new_tokens=12, eos_token_id=[], stop=[stop])
    assert r.result(60) == free[: end + 1] and r.finish_reason == "stop"
    assert_no_compile(engine)


def test_a_chunk_ends_when_every_row_is_done(engine, tiny_model):
    """A decode chunk stops at the step where its last active row draws an EOS id or its last allowed token,
    not after ``chunk`` steps: the ring's write index (one slot per step) moves by exactly the steps needed, and
    the answers are `generate`'s."""
    rng = np.random.default_rng(5)  # the eos test's prompt and reference (compiled already)
    ids, pix = make_prompt(rng, 2, True)
    free = reference(tiny_model, ids, pix, 12)
    p = 3 if free[3] not in free[:3] else 1  # a chunk of 4 steps ends after p steps

    def steps(**kw):
        before = int(engine._state.cache.index)
        got = engine.submit(ids, pix, **kw).result(60)
        return got, (int(engine._state.cache.index) - before) % KW["max_model_len"]

    assert steps(max_new_tokens=12, eos_token_id=free[p]) == (free[: p + 1], p)  # token 0 comes from prefill
    assert steps(max_new_tokens=6, eos_token_id=[]) == (free[:6], 5)  # a whole chunk of 4, then 1 step
    assert_no_compile(engine)


def test_a_failing_request_fails_alone(engine, tiny_model):
    rng = np.random.default_rng(3)
    ids, pix = make_prompt(rng, 2, True)
    good_ids, _ = make_prompt(rng, 6, False)
    bad = engine.submit(ids, np.zeros((1, 3, 20, 20), np.float32), max_new_tokens=4)  # wrong image size
    good = engine.submit(good_ids, max_new_tokens=5, eos_token_id=[])
    assert bad.wait(60) and bad.finish_reason == "error" and "pixel_values" in str(bad.error)
    with pytest.raises(RequestFailed):
        bad.result()
    assert good.result(60) == reference(tiny_model, good_ids, None, 5)
    assert list(bad) == [] and bad.completion_tokens == 0
    assert engine.stats()["running"] == 0 and engine.error is None
    assert_no_compile(engine)


def test_submit_checks_queue_full_and_stop(tiny_model, tiny_processor):
    """An engine that is never started: nothing compiles, requests only queue."""
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, max_queue=2, **KW)
    ids, _ = make_prompt(np.random.default_rng(4), 5, False)
    with pytest.raises(ValueError, match=r"64 tokens long.*max_model_len is 64.*at most 63"):
        eng.submit(np.ones(64, np.int32), max_new_tokens=1)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        eng.submit(ids, np.zeros((1, 3, 30, 30), np.float32), max_new_tokens=1)
    with pytest.raises(ValueError, match="at most 1"):
        eng.submit(ids, np.zeros((2, 3, 30, 30), np.float32), max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        eng.submit(ids, temperature=-1.0)
    a = eng.submit(ids, max_new_tokens=3)
    b = eng.submit(np.ones(63, np.int32))  # the longest prompt that fits: room for one new token
    assert b.max_new_tokens == 1 and a.max_new_tokens == 3
    with pytest.raises(QueueFull):
        eng.submit(ids, max_new_tokens=3)
    a.cancel()  # a queued request ends at the next look at the queue; stop() cancels the rest
    eng.stop(0)
    assert a.finish_reason == b.finish_reason == "cancelled" and a.done and b.done
    with pytest.raises(EngineStopped):
        eng.submit(ids, max_new_tokens=3)


@pytest.mark.slow
def test_stress_32_mixed_requests(tiny_model, tiny_processor):
    """Slow twin of test_greedy_equals_generate_alone_with_staggered_requests (and of the cancel test): 32
    requests on 8 slots, greedy and sampled (equal to `generate` with the same seed), text and images, submitted
    in random bursts, some cancelled mid-decode (their tokens a prefix of the whole answer); no compile after
    warm-up."""
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, max_batch=8, max_model_len=64, chunk=4, prefill_buckets=(32, 64),
                 max_queue=32).start()
    assert eng.wait_ready(300)
    programs = eng.compile_count()
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(32):
        image = bool(rng.integers(2))
        ids, pix = make_prompt(rng, int(rng.integers(1, 3)) if image else int(rng.integers(2, 15)), image)
        sample = i % 3 == 0
        kw = dict(temperature=1.3, top_p=0.9, seed=100 + i) if sample else {}
        jobs.append((ids, pix, int(rng.integers(1, 17)), kw, i % 7 == 3))
    reqs = []
    for i, (ids, pix, m, kw, cancel) in enumerate(jobs):
        reqs.append(eng.submit(ids, pix, max_new_tokens=m, eos_token_id=[], **kw))
        if rng.random() < 0.3:
            time.sleep(float(rng.random()) * 0.05)
    for r, (_, _, m, _, cancel) in zip(reqs, jobs):
        if cancel and m > 8:
            r.cancel()
    for r, (ids, pix, m, kw, cancel) in zip(reqs, jobs):
        assert r.wait(300) and r.finish_reason in ("length", "cancelled")
        got = r.tokens
        samp = dict(do_sample=True, temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"]) if kw else {}
        want = generate(module, params, ids[None], pix, max_new_tokens=m, eos_token_id=[], **samp)[0].tolist()
        if r.finish_reason == "cancelled":
            assert got == want[: len(got)]
        else:
            assert r.finish_reason == "length" and got == want, f"request {r.id}"
    assert eng.compile_count() == programs
    eng.stop(5)


class QueueChannel:
    """In-process stand-in for `parallel.distributed.BroadcastChannel`: the leader's messages, in order."""

    def __init__(self):
        self.q, self.sent = queue.Queue(), collections.Counter()

    def send(self, msg):
        self.sent[msg[0]] += 1
        self.q.put(msg)

    def recv(self):
        return self.q.get(timeout=120)


def test_a_follower_mirrors_the_leader(tiny_model, tiny_processor):
    """Multi-host serving's protocol on one process: a leader engine sends every device call to a follower
    engine (its own state, the same programs); the leader's answers equal `generate` alone, the follower ends with
    the leader's stop, and its device state is then the leader's, leaf for leaf."""
    module, params = tiny_model
    channel = QueueChannel()
    leader = Engine(module, params, tiny_processor, channel=channel, **KW)
    follower = Engine(module, params, tiny_processor, channel=channel, **KW)
    thread = threading.Thread(target=follower.follow, daemon=True)
    thread.start()
    leader.start()
    rng = np.random.default_rng(0)  # the staggered test's first five prompts (their references compiled once)
    specs = [(5, False, 12), (2, True, 7), (11, False, 3), (1, True, 14), (8, False, 16)]
    prompts = [make_prompt(rng, n, img) for n, img, _ in specs]
    with leader._cv:  # three admitted together, two later
        reqs = [leader.submit(ids, pix, max_new_tokens=m, eos_token_id=[]) for (ids, pix), (_, _, m) in
                zip(prompts[:3], specs)]
    reqs[0].wait(120)
    reqs += [leader.submit(ids, pix, max_new_tokens=m, eos_token_id=[]) for (ids, pix), (_, _, m) in
             zip(prompts[3:], specs[3:])]
    for r, (ids, pix), (_, _, m) in zip(reqs, prompts, specs):
        assert r.result(120) == reference(tiny_model, ids, pix, m), f"request {r.id}"
    leader.stop(10)
    thread.join(60)
    assert not thread.is_alive() and follower.ready
    assert channel.sent["stop"] == 1 and channel.sent["admit"] >= 2 and channel.sent["decode"] >= 2
    for a, b in zip(jax.tree.leaves(leader._state), jax.tree.leaves(follower._state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_engine_on_a_mesh_equals_generate(tiny_model, tiny_processor):
    """The engine's mesh code path (explicit state shardings, placed host arrays, calls inside the mesh and the
    serving rules) on this process's one device, with two images in one request (image bucket 2) beside a text
    prompt in one batched prefill; the 4-device mesh over two processes is the slow
    tests/serving/test_multihost_serve.py."""
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, mesh=make_mesh("fsdp=1", module.config, devices=jax.devices()[:1]), max_batch=2,
                 max_model_len=96, chunk=4, prefill_buckets=(64,), image_buckets=(0, 2), batch_buckets=(2,))
    eng.start()
    try:
        assert eng.wait_ready(300) and eng.error is None
        rng = np.random.default_rng(4)
        ids = np.concatenate([[1], np.full(SEQ, TINY_IMAGE_TOKEN), [7, 9], np.full(SEQ, TINY_IMAGE_TOKEN), [5]])
        pix = rng.standard_normal((2, 3, 30, 30)).astype(np.float32)
        text, _ = make_prompt(rng, 11, False)
        with eng._cv:
            reqs = [eng.submit(ids, pix, max_new_tokens=6, eos_token_id=[]),
                    eng.submit(text, max_new_tokens=3, eos_token_id=[])]
        assert reqs[0].result(120) == reference(tiny_model, ids.astype(np.int32), pix, 6)
        assert reqs[1].result(120) == reference(tiny_model, text, None, 3)
        assert eng.stats()["admit_calls"] == 1
        assert eng._state.cache.k[0].sharding.mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}
    finally:
        eng.stop(5)


def test_decode_chunk_reads_the_cache_in_place(engine):
    """The compiled decode chunk (all slots) writes each layer's KV cache in place and makes no other buffer of
    its size: no transposed copy for the attention matmuls (the [B, S, K, H] layout made XLA write one per layer
    per step), no second copy of it."""
    state = engine._state
    rows = engine.max_batch
    args = engine._decode_args(np.zeros((rows,), bool))
    text = engine._decode[rows].lower(engine.params, state, *args).compile().as_text()
    k = state.cache.k[0]
    size = math.prod(k.shape)
    big = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([0-9,]+)\]\{[^}]*\} (\S+)\(", line)
        if m and math.prod(int(x) for x in m.group(2).split(",")) == size \
                and m.group(3) not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            big.append((m.group(1), m.group(2), m.group(3)))
    assert big, "the parser found no cache-sized instruction (the HLO text format changed?)"
    updates = [b for b in big if b[2] == "dynamic-update-slice" or (b[2] == "fusion" and "dynamic-update-slice" in b[0])]
    # k and v of each layer (XLA may peel or unroll the chunk's loop, so a multiple of that), nothing else
    assert updates == big and len(big) % (2 * len(state.cache.k)) == 0, "\n".join(map(str, big))
