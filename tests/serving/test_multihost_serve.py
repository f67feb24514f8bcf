"""Multi-host serving: two `vipllava-jax serve` processes on localhost (jax.distributed + gloo, 2 CPU devices
each, the tiny checkpoint sharded over a fsdp=2,tensor=2 mesh across both). Process 0 serves HTTP and plans; process
1 follows its device calls. Concurrent requests get `generate`'s greedy answers for each alone; SIGTERM to process
0 drains it, stops the follower too, and both exit 0.

Slow (two processes compile every bucket over gloo). Its fast twins: tests/generation/test_engine.py's
`test_a_follower_mirrors_the_leader` (the leader/follower protocol in one process) and
`test_engine_on_a_mesh_equals_generate` (the engine's mesh code path)."""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vipllava_jax.data import chat
from vipllava_jax.data.prompts import VIPLLAVA_CHAT_TEMPLATE
from vipllava_jax.generation import cut_at_stop, generate, stop_strings_for
from vipllava_jax.serving.app import default_stop

from test_server import png_url, user

pytestmark = pytest.mark.slow
NEW = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_serve_one_model(tiny_hf, tiny_model, tiny_processor, tmp_path):
    coord, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"proc{i}.log")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vipllava_jax.cli", "serve", "--model", str(tiny_hf), "--served-model-name", "tiny",
             "--port", str(port), "--max-model-len", "96", "--max-batch", "4", "--chunk", "4",
             "--compilation-cache", "", "--shutdown-grace", "20", "--mesh", "fsdp=2,tensor=2",
             "--coordinator", f"localhost:{coord}", "--num-processes", "2", "--process-id", str(i)],
            stdout=open(logs[i], "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                for p, log in zip(procs, logs):
                    assert p.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() - t0 < 600, logs[0].read_text()[-3000:]
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            prompts = [user("What?", png_url()), user("Name the colours"), user("Shape", png_url(noise=3)),
                       user("Count the shapes")]

            def ask(messages):
                r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                             "max_tokens": NEW, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, prompts))
        # the same requests through `generate` alone, on one process, as the server renders them
        module, params = tiny_model
        template = chat.select_template(tiny_processor.chat_template, None) or VIPLLAVA_CHAT_TEMPLATE
        stop = default_stop(template)
        tables = stop_strings_for(tiny_processor.tokenizer, stop, module.config.text.vocab_size) if stop else None
        for messages, got in zip(prompts, answers):
            hf = [{"role": m["role"], "content": [{"type": "image", "url": p["image_url"]["url"]}
                                                   if p["type"] == "image_url" else p for p in m["content"]]}
                  for m in messages]
            enc = tiny_processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     chat_template=template)
            row = generate(module, params, enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"],
                           max_new_tokens=NEW, stop_strings=tables, pad_token_id=tiny_processor.pad_token_id,
                           eos_token_id=tiny_processor.eos_token_id)[0].tolist()
            assert got == cut_at_stop(tiny_processor.decode(row), stop).strip(), messages
        procs[0].send_signal(signal.SIGTERM)
        for p, log in zip(procs, logs):
            assert p.wait(120) == 0, log.read_text()[-3000:]
        assert "following process 0" in logs[1].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
