"""The server's Prometheus metrics, in a registry of their own per app (two apps in one process do not share
counters), served as text at ``GET /metrics``.

  vipllava_requests_total{code}                 HTTP answers of /v1/chat/completions, by status code
  vipllava_request_finish_total{reason}         finished generations by finish reason (stop, length,
                                                cancelled, error)
  vipllava_prompt_tokens_total                  prompt tokens of admitted requests (image tokens included)
  vipllava_generation_tokens_total              tokens generated
  vipllava_queue_depth                          requests waiting for a decode slot (read from the engine)
  vipllava_busy_slots / vipllava_slots          decode slots in use / in all
  vipllava_engine_ready                         1 once warm-up is done
  vipllava_time_to_first_token_seconds          histogram: request received -> its first token
  vipllava_inter_token_latency_seconds          histogram: time between tokens of a request (tokens arrive a
                                                decode chunk at a time: each of a later chunk's k tokens
                                                counts 1/k of the wait for it)
  vipllava_e2e_request_latency_seconds          histogram: request received -> last token
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class Metrics:
    """The metrics of one app; ``engine``: where the gauges read queue depth, busy slots and readiness."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("vipllava_requests", "HTTP answers of /v1/chat/completions", ["code"], registry=r)
        self.finished = Counter("vipllava_request_finish", "Finished generations by finish reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("vipllava_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("vipllava_generation_tokens", "Tokens generated", registry=r)
        Gauge("vipllava_queue_depth", "Requests waiting for a decode slot",
              registry=r).set_function(lambda: engine.stats()["queued"])
        Gauge("vipllava_busy_slots", "Decode slots in use", registry=r).set_function(
            lambda: engine.stats()["running"])
        Gauge("vipllava_slots", "Decode slots in all", registry=r).set_function(lambda: engine.max_batch)
        Gauge("vipllava_engine_ready", "1 once the engine's warm-up is done", registry=r).set_function(
            lambda: float(bool(engine.ready) and engine.error is None))
        self.ttft = Histogram("vipllava_time_to_first_token_seconds", "Request received to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vipllava_inter_token_latency_seconds", "Time between the tokens of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vipllava_e2e_request_latency_seconds", "Request received to its last token",
                             buckets=_E2E_BUCKETS, registry=r)

    def tokens(self, received: float, last: float | None, now: float, k: int) -> None:
        """``k`` new tokens of a request at ``now`` (its previous tokens at ``last``, None: these are its first)."""
        if k <= 0:
            return
        self.generation_tokens.inc(k)
        if last is None:  # the first delivery: time to first token (the rest of its chunk came with it)
            self.ttft.observe(now - received)
            return
        gap = (now - last) / k
        for _ in range(k):
            self.itl.observe(gap)

    def text(self) -> bytes:
        return generate_latest(self.registry)
