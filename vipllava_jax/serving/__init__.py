"""An OpenAI-compatible chat server over the continuous-batching engine (`vipllava-jax serve`): `create_app`
(FastAPI; app.py), the request schema (pydantic; schema.py), Prometheus metrics (metrics.py) and `run_server`
(uvicorn; server.py). Needs the ``serve`` extra: ``pip install -e ".[serve]"``."""
from .app import TextDeltas, create_app, default_stop
from .metrics import Metrics
from .schema import APIError, ChatCompletionRequest
from .server import run_server

__all__ = ["create_app", "default_stop", "TextDeltas", "Metrics", "APIError", "ChatCompletionRequest", "run_server"]
