"""Running an app with uvicorn: `run_server` binds (127.0.0.1 by default), serves until SIGINT or SIGTERM, then
stops taking connections, lets the running requests finish for up to ``grace_s`` seconds (the app's lifespan
stops the engine with the same grace) and returns; `ServerThread` runs one in a thread (tests, benchmarks)."""
from __future__ import annotations

import signal
import threading
import time

import uvicorn

__all__ = ["run_server", "ServerThread"]


def _config(app, host: str, port: int, grace_s: float, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                          access_log=False, lifespan="on")


def run_server(app, host: str = "127.0.0.1", port: int = 8000, *, grace_s: float = 30.0,
               log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT / SIGTERM (uvicorn's handlers: stop accepting, drain, lifespan shutdown), then
    return: uvicorn re-raises the signal it caught once it has shut down (so the process would die of it);
    here that lands in a handler that only records it, and the command exits 0."""
    server = uvicorn.Server(_config(app, host, port, grace_s, log_level))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """``with ServerThread(app) as s: httpx.get(s.url + "/health")``: uvicorn on 127.0.0.1 and a free port (or
    ``port``) in a daemon thread, started within ``start_timeout`` seconds, stopped (drained up to ``grace_s``)
    on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, grace_s: float = 5.0,
                 log_level: str = "warning", start_timeout: float = 30.0):
        self.server = uvicorn.Server(_config(app, host, port, grace_s, log_level))
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
