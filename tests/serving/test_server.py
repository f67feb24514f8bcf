"""`vipllava-jax serve` (vipllava_jax.serving) on the tiny checkpoint: uvicorn on 127.0.0.1 and a free port, in a
thread, driven over HTTP with httpx (and the openai client where it is installed).

Greedy answers equal `generate` for the request alone, one at a time and concurrently; streamed chunks join to
the same text and end with [DONE]; usage; every bad request gets its status and OpenAI error body and the next
valid request is answered; 429 with Retry-After on a full queue; /health 503 before warm-up, then 200; a client
that disconnects mid-stream frees its slot; /metrics parses; the API key.

Cheap by design: one engine (4 slots, 96-token rows, chunk 4, one prompt bucket) warmed up once per module, every
reference `generate` with max_new_tokens 8 and prompts of two lengths (two compiled programs)."""
import base64
import io
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from vipllava_jax.data import Processor
from vipllava_jax.generation import cut_at_stop, generate, stop_strings_for
from vipllava_jax.generation.engine import Engine
from vipllava_jax.serving import create_app
from vipllava_jax.serving.server import ServerThread

# One worker runs the whole module: its warmed-up engine fixture (the costliest setup here) is built once.
pytestmark = pytest.mark.xdist_group("server")
KW = dict(max_batch=4, max_model_len=96, chunk=4, prefill_buckets=(96,))
MODEL = "tiny"
NEW = 8  # max_tokens of every compared request (one `generate` bucket)
URL = "/v1/chat/completions"
MAX_PIXELS = 80 * 80  # the test app's image limit (the default is 64 Mpx)
MAX_BODY = 256 * 1024


def png_url(color=(200, 30, 30), size=(40, 40), noise: int | None = None) -> str:
    if noise is None:
        im = Image.new("RGB", size, color)
    else:
        im = Image.fromarray(np.random.default_rng(noise).integers(0, 255, size[::-1] + (3,), np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image_url: str | None = None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + \
        [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def body(messages, **kw) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": NEW, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_processor):
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, **KW).start()
    assert eng.wait_ready(300) and eng.error is None
    yield eng
    eng.stop(5)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (40, 40), (10, 120, 200)).save(d / "blue.png")
    outside = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (40, 40), (10, 120, 200)).save(outside / "secret.png")
    (d / "link.png").symlink_to(outside / "secret.png")
    return d


@pytest.fixture(scope="module")
def app(engine, tiny_processor, media):
    return create_app(engine, tiny_processor, model_name=MODEL, allowed_local_media_path=media,
                      max_image_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_processor, app):
    """reference(messages, n) -> (text, prompt_tokens, row): `generate` for these messages alone, greedy, as the
    server renders them (its template, its stop string), decoded and cut as `generate_text` answers."""
    module, params = tiny_model
    stop = ("###",)
    tables = stop_strings_for(tiny_processor.tokenizer, stop, module.config.text.vocab_size)
    cache = {}

    def ref(messages, n=NEW):
        key = json.dumps(messages)
        if key not in cache:
            hf = [{"role": m["role"], "content": [{"type": "image", "url": p["image_url"]["url"]}
                                                   if p["type"] == "image_url" else p for p in m["content"]]}
                  for m in messages]
            enc = tiny_processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                chat_template=app.state.template)
            row = generate(module, params, enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"],
                           max_new_tokens=n, stop_strings=tables, pad_token_id=tiny_processor.pad_token_id,
                           eos_token_id=tiny_processor.eos_token_id)[0].tolist()
            text = cut_at_stop(tiny_processor.decode(row), stop).strip()
            cache[key] = (text, int(enc["attention_mask"].sum()), row)
        return cache[key]
    return ref


def stream_events(client, payload) -> list:
    """The SSE data of a streamed answer: parsed chunks, then the final "[DONE]"."""
    out = []
    with client.stream("POST", URL, json=payload) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def joined(events) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])


# Two prompt lengths: an image and 5 characters of text, or 16 characters of text alone.
PROMPTS = [user("What?", png_url()), user("Name the colours"), user("Shape", png_url(noise=3)),
           user("Count the shapes")]


def assert_valid_answer(client, reference, prompt=None):
    """The server still answers a valid request, correctly."""
    prompt = prompt or PROMPTS[0]
    r = client.post(URL, json=body(prompt))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference(prompt)[0]


def test_greedy_answer_equals_generate_and_usage(client, reference):
    r = client.post(URL, json=body(PROMPTS[0]))
    assert r.status_code == 200, r.text
    got = r.json()
    text, n_prompt, row = reference(PROMPTS[0])
    assert got["object"] == "chat.completion" and got["model"] == MODEL and got["id"].startswith("chatcmpl-")
    choice = got["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    # prompt_tokens: the tokens the model read, each image as its 25 image tokens; completion_tokens: generated.
    usage = got["usage"]
    assert usage["prompt_tokens"] == n_prompt and n_prompt > 25
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= NEW and choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == NEW


def test_concurrent_streaming_and_plain_requests_equal_generate_alone(client, reference):
    """4 requests at once (2 streamed, 2 not; with and without an image): each answer is `generate`'s for it
    alone; the streamed chunks join to that text, end with a finish chunk, a usage chunk and [DONE]."""
    results = {}

    def run(i):
        p = PROMPTS[i]
        if i % 2:
            results[i] = stream_events(client, body(p, stream=True, stream_options={"include_usage": True}))
        else:
            results[i] = client.post(URL, json=body(p)).json()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(PROMPTS):
        text, n_prompt, _ = reference(p)
        got = results[i]
        if i % 2 == 0:
            assert got["choices"][0]["message"]["content"] == text, i
            continue
        assert got[-1] == "[DONE]"
        assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in got[:-1])
        assert joined(got) == text, i
        finish, usage = got[-3], got[-2]
        assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
        assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == n_prompt
        assert all(c["usage"] is None for c in got[:-2])


def test_stream_without_usage_has_no_usage_field(client, reference):
    events = stream_events(client, body(PROMPTS[1], stream=True))
    assert events[-1] == "[DONE]" and all("usage" not in c for c in events[:-1])
    assert joined(events) == reference(PROMPTS[1])[0]


def test_file_url_under_the_allowed_path(client, reference, media):
    same = user("What?", png_url((10, 120, 200)))
    r = client.post(URL, json=body(user("What?", (media / "blue.png").as_uri())))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference(same)[0]


def _big_png_url():
    return png_url(size=(100, 100))


BAD = {  # id: (raw body or dict, status, param, words in the message)
    "malformed_json": (b'{"messages": [', 400, None, "Malformed JSON"),
    "not_an_object": (b"[1, 2]", 400, None, "must be an object"),
    "missing_messages": ({"model": MODEL}, 400, "messages", "'messages' is a required property"),
    "empty_messages": ({"messages": []}, 400, "messages", "at least 1"),
    "bad_role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "user"),
    "bad_part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]",
                 "audio"),
    "n_2": (body(user("hi"), n=2), 400, "n", "n=2"),
    "temperature": (body(user("hi"), temperature=3), 400, "temperature", "less than or equal to 2"),
    "undecodable_image": (body(user("hi", "data:image/png;base64," + base64.b64encode(b"not a png").decode())),
                          400, "messages[0].content[0].image_url.url", "cannot decode"),
    "malformed_data_url": (body(user("hi", "data:image/png;base64,@@@")), 400,
                           "messages[0].content[0].image_url.url", "Malformed data URL"),
    "oversized_image": (body(user("hi", "BIG")), 400, "messages[0].content[0].image_url.url", "10000 pixels"),
    "relative_path_url": (body(user("hi", "blue.png")), 400, "messages[0].content[0].image_url.url",
                          "must be a data:image"),
    "file_outside": (body(user("hi", "file:///etc/hostname")), 400, "messages[0].content[0].image_url.url",
                     "outside the allowed local media path"),
    "file_dotdot": (body(user("hi", "MEDIA/../ELSEWHERE/secret.png")), 400,
                    "messages[0].content[0].image_url.url", "outside the allowed"),
    "file_symlink_out": (body(user("hi", "MEDIA/link.png")), 400, "messages[0].content[0].image_url.url",
                         "outside the allowed"),
    "file_missing": (body(user("hi", "MEDIA/nope.png")), 400, "messages[0].content[0].image_url.url",
                     "cannot read"),
    "prompt_too_long": (body(user("x" * 120)), 400, "messages", "max_model_len is 96"),
    "max_tokens_too_many": (body(user("hi"), max_tokens=90), 400, "max_tokens", "does not fit"),
    "two_images": (body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 2
                          + [{"type": "text", "text": "hi"}]}]), 400, "messages", "at most 1"),
    "image_token_in_text": (body(user("<image> hi")), 400, "messages", "placeholder"),
    "unknown_model": ({**body(user("hi")), "model": "gpt-4o"}, 404, "model", "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_answered_and_the_next_one_served(client, reference, media, case):
    raw, status, param, words = BAD[case]
    if isinstance(raw, dict):
        outside = os.readlink(media / "link.png")
        raw = json.dumps(raw).replace("BIG", _big_png_url()).replace("MEDIA", media.as_uri()).replace(
            "ELSEWHERE", os.path.basename(os.path.dirname(outside))).encode()
    r = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err
    assert_valid_answer(client, reference)


def test_body_over_the_limit_is_413(client, reference):
    big = body(user("hi", "data:image/png;base64," + "A" * (MAX_BODY + 10)))
    r = client.post(URL, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_valid_answer(client, reference)


def test_api_key(engine, tiny_processor, reference):
    app = create_app(engine, tiny_processor, model_name=MODEL, api_key="sk-test")
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            r = c.post(URL, json=body(PROMPTS[1]), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200  # health and metrics stay open
        r = c.post(URL, json=body(PROMPTS[1]), headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reference(PROMPTS[1])[0]
        # file:// images are refused without an allowed path
        r = c.post(URL, json=body(user("hi", "file:///etc/hostname")), headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 400 and "without --allowed-local-media-path" in r.json()["error"]["message"]


def test_health_503_until_warm_then_200_and_queue_full_429(tiny_model, tiny_processor, reference):
    """An engine not started yet: /health is 503, a request waits in its queue (max_queue 1), the next is 429
    with Retry-After; once the engine has started and warmed up, /health is 200 and the waiting one is answered."""
    module, params = tiny_model
    eng = Engine(module, params, tiny_processor, **{**KW, "max_queue": 1})
    app = create_app(eng, tiny_processor, model_name=MODEL)
    try:
        with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            first = {}
            t = threading.Thread(target=lambda: first.setdefault("r", c.post(URL, json=body(PROMPTS[1]))))
            t.start()
            deadline = time.monotonic() + 30
            while eng.stats()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = c.post(URL, json=body(PROMPTS[0]))
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            eng.start()
            t.join(120)
            assert first["r"].status_code == 200
            assert first["r"].json()["choices"][0]["message"]["content"] == reference(PROMPTS[1])[0]
            assert c.get("/health").status_code == 200
    finally:
        eng.stop(5)


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(client, engine, app, reference):
    """Decode slowed to 50 ms a chunk: a stream asking for a whole row is closed after its first content chunk;
    its request is cancelled (no slot busy, the cancelled counter up) long before it could have finished."""
    fast = engine._decode  # {rows: jitted decode}

    def slowed(f):
        def slow(*a, **k):
            time.sleep(0.05)
            return f(*a, **k)
        slow._cache_size = f._cache_size
        return slow

    cancelled = app.state.metrics.finished.labels(reason="cancelled")
    before = cancelled._value.get()
    engine._decode = {rows: slowed(f) for rows, f in fast.items()}
    try:
        with client.stream("POST", URL, json={"model": MODEL, "messages": user("Count the shapes"), "stream": True,
                                              "temperature": 0}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content": "' in line and '"role"' not in line:
                    break
        t0 = time.monotonic()
        while engine.stats()["running"] or cancelled._value.get() == before:
            assert time.monotonic() - t0 < 10, engine.stats()
            time.sleep(0.02)
        assert engine.stats()["free_slots"] == KW["max_batch"]
    finally:
        engine._decode = fast
    assert cancelled._value.get() == before + 1
    assert_valid_answer(client, reference)


def test_models_and_metrics(client):
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    client.post(URL, json=body(PROMPTS[1]))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("vipllava_requests", "vipllava_request_finish", "vipllava_prompt_tokens",
                 "vipllava_generation_tokens", "vipllava_queue_depth", "vipllava_busy_slots", "vipllava_slots",
                 "vipllava_engine_ready", "vipllava_time_to_first_token_seconds",
                 "vipllava_inter_token_latency_seconds", "vipllava_e2e_request_latency_seconds"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("vipllava_requests_total", (("code", "200"),))] >= 1
    assert samples[("vipllava_generation_tokens_total", ())] >= 1
    assert samples[("vipllava_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("vipllava_engine_ready", ())] == 1


def test_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list()] == [MODEL]
    r = c.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=NEW, temperature=0)
    text, n_prompt, _ = reference(PROMPTS[0])
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == n_prompt
    pieces, usage = [], None
    for ch in c.chat.completions.create(model=MODEL, messages=PROMPTS[1], max_completion_tokens=NEW, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        pieces += [ch.choices[0].delta.content or ""] if ch.choices else []
        usage = ch.usage or usage
    assert "".join(pieces) == reference(PROMPTS[1])[0] and usage.prompt_tokens == reference(PROMPTS[1])[1]
    with pytest.raises(openai.BadRequestError, match="n=3"):
        c.chat.completions.create(model=MODEL, messages=PROMPTS[1], n=3)


def test_cli_refuses_bad_settings(tiny_hf, capsys):
    from vipllava_jax.cli import main
    assert main(["serve", "--model", str(tiny_hf), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_32_concurrent_mixed_requests_equal_generate_alone(client, reference):
    """The stress twin of the 4-request test: 32 requests at once (8 clients' worth of queueing on 4 slots),
    half streamed, a quarter sampled (checked for form and reproducibility by seed, not against generate)."""
    prompts = [PROMPTS[i % 4] for i in range(32)]
    results = {}

    def run(i):
        p = prompts[i]
        extra = {"temperature": 0.8, "seed": i} if i % 4 == 3 else {}
        if i % 2:
            results[i] = joined(stream_events(client, body(p, stream=True, **extra)))
        else:
            results[i] = client.post(URL, json=body(p, **extra)).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, p in enumerate(prompts):
        if i % 4 != 3:
            assert results[i] == reference(p)[0], i
    again = client.post(URL, json=body(prompts[3], temperature=0.8, seed=3)).json()["choices"][0]["message"]
    assert again["content"] == results[3]


@pytest.mark.slow
def test_serve_command_answers_and_drains_on_sigterm(tiny_hf, reference):
    """`vipllava-jax serve` in a child process: /health turns 200; SIGTERM in the middle of a stream lets it
    finish (it ends with [DONE]) and the process exits 0."""
    import signal
    import socket
    import subprocess
    import sys

    from conftest import subprocess_env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vipllava_jax.cli", "serve", "--model", str(tiny_hf),
                             "--served-model-name", MODEL, "--port", str(port), "--max-model-len", "96",
                             "--max-batch", "4", "--chunk", "4", "--compilation-cache", "", "--shutdown-grace", "20"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "no 200 from /health in time"
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            events = []
            with c.stream("POST", URL, json=body(PROMPTS[1], max_tokens=50, stream=True)) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            proc.send_signal(signal.SIGTERM)
            assert events[-1] == "[DONE]"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_model_answers_demo_scenes():
    """The shipped demo model served: its answers to 8 demo scenes equal `generate_text`'s and are mostly right
    (the model scores 90% on held-out scenes)."""
    from vipllava_jax import load_pretrained
    from vipllava_jax.data.synthetic import DEMO_SCENE, make_scene
    from vipllava_jax.evals import demo_model_path
    from vipllava_jax.generation import generate_text

    path = demo_model_path()
    module, params = load_pretrained(path, progress=False)
    proc = Processor.from_pretrained(path)
    eng = Engine(module, params, proc, max_batch=8, max_model_len=64, chunk=4, prefill_buckets=(64,)).start()
    try:
        assert eng.wait_ready(300)
        app = create_app(eng, proc, model_name="demo")
        scenes = [make_scene(i, **DEMO_SCENE) for i in range(8)]
        answers = {}
        with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as c:
            def ask(i):
                buf = io.BytesIO()
                scenes[i].image.save(buf, "PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                r = c.post(URL, json={"model": "demo", "messages": user(scenes[i].question, url), "max_tokens": 8})
                answers[i] = r.json()["choices"][0]["message"]["content"]

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        for i, sc in enumerate(scenes):
            prompt = proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sc.question}]}],
                add_generation_prompt=True)
            want = generate_text(module, params, proc, [prompt], [sc.image], max_new_tokens=8, stop=())[0]
            assert answers[i] == want, i
        assert sum(answers[i] == sc.answer for i, sc in enumerate(scenes)) >= 6, answers
    finally:
        eng.stop(5)


@pytest.mark.slow
def test_serve_benchmark_runs(tmp_path, capsys):
    """bench/serve.py end to end, small: our server only, 2 requests at 1 and 2 clients."""
    import runpy
    from pathlib import Path
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "serve.py"))
    out = tmp_path / "serve.jsonl"
    assert bench["main"](["--skip-transformers", "--concurrency", "1,2", "--requests", "2", "--max-tokens", "8",
                          "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["impl"], r["concurrency"]) for r in rows} == {("vipllava-jax", 1), ("vipllava-jax", 2)}
    assert all(r["n"] == 2 and r["errors"] == 0 and r["req_s"] > 0 for r in rows)
    # CPU per request of the server (from /proc) and of the client: the server decoded images and ran the model
    on_linux = Path("/proc/self/stat").exists()  # the server's CPU time comes from /proc
    assert all(r["cpu_client_ms"] > 0 and (r["cpu_server_ms"] > 0 if on_linux else r["cpu_server_ms"] is None)
               for r in rows)
    out = capsys.readouterr().out
    assert "ratios" in out and "p99 TTFT at 2 clients / median TTFT at 1 client" in out
