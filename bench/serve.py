"""Serving benchmark: `vipllava-jax serve` against `transformers serve`, side by side in one run, on the same model
and the same requests, both on 127.0.0.1.

    python bench/serve.py                                    # the shipped demo model; CPU: ~5-10 minutes
    python bench/serve.py --concurrency 1,16 --requests 32 --max-tokens 8 --skip-transformers
    python bench/serve.py --json serve.jsonl

Each server is started as a child process (ours: ``python -m vipllava_jax.cli serve``; theirs: ``transformers serve
MODEL``, which needs fastapi, uvicorn and accelerate), waited for (/health 200, then two warm-up requests), driven,
and stopped (SIGTERM), one after the other, so they never share the CPU. The requests: synthetic demo scenes
(`make_scene(i, **DEMO_SCENE)`, PNG data URLs) with their question, streamed, greedy (temperature 0), for
``max_tokens`` 8 (the scene's question: a one-word answer, 2 tokens with EOS) and 64 (the list question "List the
shapes from left to right.": a 10-20 token answer; generation stops at EOS, as a client would see it). For each
server, max_tokens and concurrency C: --requests requests from C concurrent clients (httpx, asyncio), bounded by
--cell-timeout seconds (no new request starts after it; what finished is counted).

Reported (client-side wall time, time.perf_counter):
  req_s       requests finished per second over the cell's wall time
  tok_s       output tokens per second (usage.completion_tokens; content chunks where a server sends no usage)
  ttft p50/p99 seconds from sending a request to its first content
  itl p50/p99  per request: (last content - first content) / (tokens - 1), seconds per token
  cpu srv/cli  CPU time (user + system) per finished request over the cell: the server process (all its threads;
               from /proc, Linux only) and this client process. Client and server share the machine's cores, so
               with the CPUs busy, req_s can grow with concurrency only as far as batching lowers the sum.
Ratios: our req_s at each concurrency over our req_s at concurrency 1; our best req_s over theirs (best of any
concurrency); our p99 TTFT at each concurrency over our median TTFT at concurrency 1.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import httpx  # noqa: E402

from vipllava_jax.data.synthetic import DEMO_SCENE, LIST_QUESTION, make_scene  # noqa: E402

DEMO_MODEL = REPO / "vipllava_jax" / "assets" / "demo_model"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL), help="model directory (default: the shipped demo model)")
    ap.add_argument("--concurrency", default="1,8,16,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--max-tokens", default="8,64", help="comma-separated max_tokens settings")
    ap.add_argument("--requests", type=int, default=256,
                    help="requests per (server, max_tokens, concurrency) cell (fewer: at 16-32 clients the cell is "
                         "over in a second or less, and its start, all clients at once, weighs on it)")
    ap.add_argument("--cell-timeout", type=float, default=120.0, help="seconds per cell before no new request starts")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    ap.add_argument("--max-batch", type=int, default=16, help="our server's decode slots")
    ap.add_argument("--max-model-len", type=int, default=128, help="our server's tokens per request")
    ap.add_argument("--skip-transformers", action="store_true", help="only our server")
    ap.add_argument("--json", default=None, help="append the result rows to this file (JSON lines)")
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads(model_name: str, n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        scene = make_scene(i, **DEMO_SCENE)
        buf = io.BytesIO()
        scene.image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = scene.question if max_tokens <= 8 else LIST_QUESTION
        out.append({"model": model_name, "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": question}]}]})
    return out


class Server:
    """A server child process: started, waited for, stopped."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env=None):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        with httpx.Client(timeout=10) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{self.name} was not ready in {timeout:.0f} s:\n{self.tail()}")
                try:
                    if c.get(self.url + "/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                time.sleep(0.5)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    chunks, tokens, text = 0, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"].get("completion_tokens")
            for ch in data.get("choices") or ():
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(piece)
    n = tokens if tokens is not None else chunks
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": n, "text": "".join(text),
            "itl": (last - first) / (n - 1) if first is not None and n > 1 else None}


async def drive(url: str, reqs: list[dict], concurrency: int, timeout: float) -> dict:
    results, errors = [], []
    todo = list(reqs)
    t0 = time.perf_counter()

    async def worker(client):
        while todo and time.perf_counter() - t0 < timeout:
            payload = todo.pop(0)
            try:
                results.append(await one(client, url, payload))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=max(timeout, 60) * 2, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0

    def pct(xs, q):
        xs = sorted(x for x in xs if x is not None)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else None

    ttft, itl = [r["ttft"] for r in results], [r["itl"] for r in results]
    return {"n": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "req_s": len(results) / wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "answers": [r["text"] for r in results[:3]]}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads), or None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, model_name: str, args, concs, max_tokens) -> list[dict]:
    rows = []
    for mt in max_tokens:
        reqs = payloads(model_name, args.requests, mt)
        asyncio.run(drive(server.url, reqs[:2], 1, 120))  # warm-up (transformers serve loads lazily)
        for c in concs:
            srv0, cli0 = process_cpu_s(server.proc.pid), time.process_time()
            res = asyncio.run(drive(server.url, reqs, c, args.cell_timeout))
            srv1, cli1 = process_cpu_s(server.proc.pid), time.process_time()
            n = max(res["n"], 1)
            res["cpu_server_ms"] = None if srv0 is None or srv1 is None else (srv1 - srv0) * 1000 / n
            res["cpu_client_ms"] = (cli1 - cli0) * 1000 / n
            row = {"impl": server.name, "max_tokens": mt, "concurrency": c, **res}
            rows.append(row)
            print(f"  {server.name:>12}  max_tokens {mt:>3}  clients {c:>3}: {res['n']:>3} req in "
                  f"{res['wall_s']:6.1f} s  {res['req_s']:7.2f} req/s  {res['tok_s']:8.1f} tok/s  ttft p50 "
                  f"{_f(res['ttft_p50'])} p99 {_f(res['ttft_p99'])}  itl p50 {_f(res['itl_p50'])}  cpu/req server "
                  f"{_ms(res['cpu_server_ms'])} client {_ms(res['cpu_client_ms'])}"
                  f"{'  errors ' + str(res['errors']) + ': ' + str(res['first_error'])[:200] if res['errors'] else ''}",
                  flush=True)
    return rows


def _f(x):
    return "   -   " if x is None else f"{x * 1000:6.1f}ms"


def _ms(x):
    return "   -   " if x is None else f"{x:6.2f}ms"


def main(argv=None) -> int:
    args = parse_args(argv)
    concs = [int(x) for x in args.concurrency.split(",")]
    max_tokens = [int(x) for x in args.max_tokens.split(",")]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    port = free_port()
    ours = Server("vipllava-jax", [sys.executable, "-m", "vipllava_jax.cli", "serve", "--model", args.model,
                                   "--served-model-name", "demo", "--port", str(port), "--max-batch",
                                   str(args.max_batch), "--max-model-len", str(args.max_model_len), "--max-queue",
                                   "4096", "--log-level", "warning"], port, workdir / "ours.log", env)
    try:
        ready = ours.wait_ready(args.start_timeout)
        print(f"vipllava-jax serve ready in {ready:.1f} s (load + warm-up)", flush=True)
        rows += measure(ours, "demo", args, concs, max_tokens)
    finally:
        ours.stop()

    if not args.skip_transformers:
        exe = shutil.which("transformers")
        if exe is None:
            notes.append("transformers serve: the `transformers` command is not installed")
        else:
            port = free_port()
            theirs = Server("transformers", [exe, "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
                                             "--device", "cpu", "--log-level", "warning"], port,
                            workdir / "transformers.log", env)
            try:
                ready = theirs.wait_ready(args.start_timeout)
                print(f"transformers serve ready in {ready:.1f} s", flush=True)
                rows += measure(theirs, args.model, args, concs, max_tokens)
            except RuntimeError as e:
                notes.append(f"transformers serve could not be measured: {e}")
                print(notes[-1], flush=True)
            finally:
                theirs.stop()

    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "model": args.model, "requests": args.requests}
    print(f"\n{meta}")
    print(f"{'impl':>12} {'max_tok':>7} {'clients':>7} {'n':>4} {'req/s':>8} {'tok/s':>8} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'itl p50':>9} {'itl p99':>9} {'cpu srv':>9} {'cpu cli':>9}")
    for r in rows:
        print(f"{r['impl']:>12} {r['max_tokens']:>7} {r['concurrency']:>7} {r['n']:>4} {r['req_s']:8.2f} "
              f"{r['tok_s']:8.1f} {_f(r['ttft_p50']):>9} {_f(r['ttft_p99']):>9} {_f(r['itl_p50']):>9} "
              f"{_f(r['itl_p99']):>9} {_ms(r['cpu_server_ms']):>9} {_ms(r['cpu_client_ms']):>9}")
    print("\nratios:")
    for mt in max_tokens:
        mine = {r["concurrency"]: r for r in rows if r["impl"] == "vipllava-jax" and r["max_tokens"] == mt}
        theirs = [r for r in rows if r["impl"] == "transformers" and r["max_tokens"] == mt]
        if 1 in mine and mine[1]["req_s"]:
            for c in concs[1:]:
                if c in mine:
                    print(f"  max_tokens {mt}: ours at {c} clients / ours at 1 client: "
                          f"{mine[c]['req_s'] / mine[1]['req_s']:.2f}x requests/s")
            for c in concs[1:]:
                if c in mine and mine[1]["ttft_p50"] and mine[c]["ttft_p99"]:
                    print(f"  max_tokens {mt}: ours p99 TTFT at {c} clients / median TTFT at 1 client: "
                          f"{mine[c]['ttft_p99'] / mine[1]['ttft_p50']:.2f}x")
        if theirs and mine:
            best_t = max(r["req_s"] for r in theirs)
            best_o = max(r["req_s"] for r in mine.values())
            tok_o, tok_t = max(r["tok_s"] for r in mine.values()), max(r["tok_s"] for r in theirs)
            if best_t and tok_t:
                print(f"  max_tokens {mt}: ours best / transformers serve best: {best_o / best_t:.2f}x requests/s "
                      f"({best_o:.2f} vs {best_t:.2f}), {tok_o / tok_t:.2f}x tokens/s")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
