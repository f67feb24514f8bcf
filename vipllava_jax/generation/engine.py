"""The device core of a continuous-batching server: one engine thread owns the device and decodes up to
``max_batch`` requests at once; a new request joins between two decode chunks, without waiting for the
running ones, and a finished or cancelled one leaves its slot at once.

Use::

    engine = Engine(module, params, processor, max_batch=16, max_model_len=2048, chunk=8)
    engine.start()                        # warm-up compiles every shape in the engine thread; engine.ready
    enc = processor([build_prompt("What is in the red box?")], [image])
    req = engine.submit(**enc, max_new_tokens=64, temperature=0.0, stop=("###",))
    for token_id in req:                  # blocks; ends when the request finishes
        ...
    req.finish_reason                     # "stop" | "length" | "cancelled" | "error"
    req.usage                             # {"prompt_tokens", "completion_tokens", "total_tokens"}
    engine.stop(grace_s=10)

API (all methods thread-safe; each ``Request`` has one consumer):

* ``Engine(module, params, processor=None, *, max_batch=16, max_model_len=None, chunk=8, mesh=None,
  prefill_buckets=None, image_buckets=None, batch_buckets=None, max_queue=64, rules=LOGICAL_AXIS_RULES,
  channel=None)``. ``processor``: a `data.Processor` (its EOS id is the default EOS, its tokenizer builds the
  stop-string tables); None: the checkpoint's EOS, no stop strings.
  ``max_model_len``: slots per row of the KV cache, prompt and new tokens together (default and upper bound:
  the model's max_position_embeddings). ``chunk``: decode steps per device call (new requests join and
  finished ones leave between chunks). ``prefill_buckets``: prompt lengths prefill compiles for (default 16, 32,
  64, ... and max_model_len); ``image_buckets``: image counts per request it compiles for (default (0, 1));
  ``batch_buckets``: row counts of a batched prefill and of a decode chunk (default 1, 4, 16, ... and max_batch;
  K prompts of a length bucket Tb are prefilled together only while K x Tb <= max(2048, max_model_len));
  ``max_queue``: requests waiting for a slot before `submit` raises `QueueFull`. ``mesh``: a Mesh over every
  device (of every host) to shard over: weights and the cache's kv heads by ``rules``, slots replicated
  (`serving_rules`); load the params with the same mesh. ``channel``: multi-host serving (below).
* ``engine.start(warmup=True)``: starts the engine thread; with ``warmup`` it first compiles (and runs once)
  the prefill+insert for every (length bucket, image bucket) pair that can hold a prompt and the decode chunk,
  so no request compiles anything afterwards; ``engine.ready`` turns True then (``engine.wait_ready(timeout)``).
  Requests submitted before that wait in the queue.
* ``engine.submit(input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens=None, temperature=0.0,
  top_p=1.0, seed=None, stop=(), eos_token_id=None, on_update=None) -> Request``: one prompt in the processor's
  format (``input_ids`` [T] or [1, T], left padding stripped by ``attention_mask``; each ``<image>`` expanded
  to image_seq_length image tokens; ``pixel_values`` [I, 3, H, W]), so ``submit(**processor([prompt], images),
  ...)`` works. ``max_new_tokens``: None or more than fits means up to max_model_len in all (finish reason
  "length"). ``temperature`` 0 is greedy, else sampling with ``top_p`` (HF's semantics) from ``seed`` (None: a
  random one). ``stop``: stop strings, matched as `generate`'s ``stop_strings`` are (the token that completes
  one is the last token delivered; cut the text with `cut_at_stop`). ``eos_token_id``: None is the processor's
  (else the checkpoint's), [] none; the EOS token is delivered, as `generate` returns it. ``on_update(request,
  new_token_ids, finished)`` is called on the engine thread after each chunk (keep it short; for asyncio use
  ``loop.call_soon_threadsafe``). Raises `QueueFull` when ``max_queue`` requests wait, `EngineStopped` after
  `stop`, ValueError for a prompt longer than max_model_len - 1 (naming both lengths), ids outside the
  vocabulary, image tokens that do not match the images, more images than the largest image bucket, or bad
  sampling settings. Checks of the pixels themselves run on the engine thread: they fail that request only.
* ``Request``: ``for token_id in request`` / ``request.deltas(timeout)`` (lists of new ids per chunk) block
  until the next tokens; ``request.result(timeout)`` waits and returns all token ids (raises `RequestFailed` on
  "error"); ``request.tokens`` (delivered so far), ``finish_reason`` (None while running), ``error``,
  ``usage``, ``prompt_tokens``, ``completion_tokens``, ``done``, ``wait(timeout)``, ``cancel()`` (its slot is
  free at the next chunk boundary; a queued request is dropped at once), ``submitted_at`` /
  ``first_token_at`` / ``finished_at`` (time.monotonic()).
* ``engine.follow(warmup=True)``: on every process but 0 of a multi-host engine, instead of `start`.
* ``engine.stop(grace_s=30.0)``: stops accepting, lets the running and queued requests finish for up to
  ``grace_s`` seconds, cancels the rest and ends the thread. ``engine.stats()``: running, queued, free slots,
  chunks and tokens so far, compiled programs. ``engine.compile_count()``: programs compiled by the engine's
  jitted functions (flat after warm-up).

How it runs (shapes: B = max_batch slots, S = max_model_len, Tb a prompt bucket, Ib an image bucket):

* The device state (`SlotState`) holds a ring `KVCache` [layers x (B, S, kv_heads, head_dim)] with one write
  index shared by all slots (a scalar-position, in-place cache write per decode step, as `generate`'s loop
  does) and per-slot vectors: the last token, its RoPE position, the tokens drawn (the PRNG counter), seed,
  temperature and top_p.
* Admission (one jitted call for the requests admitted together at a chunk boundary, the state donated):
  vision tower, projector and the prompts [K, Tb] (left padded to the longest one's bucket, K padded to a batch
  bucket with rows whose writes are dropped, images in row order padded with ``image_valid``) through the
  decoder into a fresh [K, Tb] cache, the first tokens chosen, and each prompt's keys and values written into
  its slot's row of the ring at the Tb positions that end at the shared write index (wrapping around; the row's
  mask is reset, so the rest of the row is masked out). The first tokens go to their requests at once (before
  the next chunk), and a request may end there.
* Decode chunk (one jitted call, the state donated): up to ``chunk`` steps for the first R slots, R the
  smallest batch bucket holding every busy slot (free slots are taken lowest first); inactive slots among them
  are masked (their tokens ignored, their positions held at 0). The chunk's loop ends early once every active
  row has drawn an EOS id or its max_new_tokens (so a two-token answer pays for one step, not ``chunk``).
  Tokens [R, chunk] come back to the host once per chunk; EOS, stop strings (the device automaton's tables, run
  on the host) and max_new_tokens are checked there, and tokens after a row's end are dropped. A finished
  slot's keys and values stay until the next request's admission resets the row's mask.
* A request needs prompt + new - 1 ring slots; the ring holds S, so requests never overwrite their own
  tokens. Greedy output equals `generate` for that request alone, whatever runs beside it (rows never mix:
  RoPE positions are per slot; attention only reads the row's own mask).
* Cost: a decode step runs R slots (masked, not skipped, when idle among them) and attends over the whole
  S-slot row of each, so its cache reads grow with max_model_len, not with the requests' lengths: size S to the
  load. Measured (idle 2-core CPU, 2026-12-07, the demo model, B 16, S 128, chunk 8): a whole decode chunk
  1.0 ms at R 1, 1.4 at R 4, 3.6 at R 16 (a chunk ended after one step: 0.4-0.6 ms); an admission of K
  41-token prompts with an image each (bucket 64) 2.4 ms at K 1, 6.2 at K 4, 16.5 at K 16.
* The host loop is ``plan = self._plan()`` (all scheduling decisions: admissions into free slots, which slots
  decode, cancellations, the stop) then ``self._execute(plan)`` (device calls and token delivery).
* Multi-host: every process builds the same Engine with ``mesh`` over all devices and ``channel`` (a
  `parallel.distributed.BroadcastChannel`). Process 0 runs `start` (and the HTTP server); every device call its
  engine makes after the warm-up (an admission's packed arrays, a decode chunk's rows and active slots, a state
  reset, an idle heartbeat every HEARTBEAT_S) is first sent over the channel, and the other processes, in
  `follow`, make the same call on their shards, until process 0 sends "stop". Each process warms up alike on its
  own. Only process 0 reads tokens back and talks to clients.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax.sharding import NamedSharding, PartitionSpec as P

from ..models.llama import KVCache
from ..models.vipllava import check_token_ids, image_token_mismatch
from ..parallel.jit import mesh_context
from ..parallel.rules import LOGICAL_AXIS_RULES
from ..parallel.shardings import cache_shardings, param_shardings, put_global, shard_params
from .inputs import check_count, check_seed, eos_ids, pad_id
from .loop import _unscanned
from .sampling import apply_top_p
from .stop_strings import stop_strings_for

Array = jax.Array
log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
HEARTBEAT_S = 1.0  # a multi-host leader with nothing to do still sends a message this often (followers wait in it)


class QueueFull(RuntimeError):
    """`Engine.submit` when ``max_queue`` requests already wait for a slot (an HTTP server answers 429/503)."""


class EngineStopped(RuntimeError):
    """`Engine.submit` after `Engine.stop` (or after the engine thread died)."""


class RequestFailed(RuntimeError):
    """`Request.result` of a request that ended with finish reason "error" (the cause is ``__cause__``)."""


# --- device side ------------------------------------------------------------------------------------------------
@struct.dataclass
class SlotState:
    cache: KVCache  # ring: [B, S] per layer, one shared write index
    last: Array  # [B] int32: the newest token of each slot (the next decode input)
    positions: Array  # [B] int32: RoPE position of `last`
    steps: Array  # [B] int32: tokens drawn so far (PRNG counter: token i uses fold_in(key(seed), i))
    seeds: Array  # [B] int32
    temperature: Array  # [B] float32, 0 = greedy
    top_p: Array  # [B] float32


def select_slot_tokens(logits, temperature, top_p, seeds, steps):
    """[B, V] logits -> [B] int32 with per-row settings: argmax where temperature is 0, else a sample after
    temperature and top-p (HF's order), from key fold_in(key(seed), step), as `generate` draws for one row."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0

    def sample():
        x = logits / jnp.where(sampling, temperature, 1.0)[:, None]
        x = jax.lax.cond(jnp.any(top_p < 1.0), lambda x: jnp.where((top_p < 1.0)[:, None],
                                                                   apply_top_p(x, top_p[:, None]), x),
                         lambda x: x, x)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, x).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampling), sample, lambda: greedy)
    return jnp.where(sampling, drawn, greedy)


def _init_fn(module, batch: int, max_len: int):
    def init() -> SlotState:
        cache = KVCache.init(module.config.text, batch, max_len, module.dtype).replace(ring=True)
        z = jnp.zeros((batch,), jnp.int32)
        return SlotState(cache=cache, last=z, positions=z, steps=z, seeds=z,
                         temperature=jnp.zeros((batch,), jnp.float32), top_p=jnp.ones((batch,), jnp.float32))
    return init


def _admit_fn(module):
    """Prefill K prompts [K, Tb] in one call and write each into its slot of the ring, ending at the write index.
    A row whose slot is out of range (>= B) is padding: it is computed and its writes are dropped."""
    cfg = module.config

    def admit(params, state: SlotState, ids, pixel_values, mask, image_valid, slots, seeds, temperature, top_p):
        k, tb = ids.shape
        s = state.cache.max_len
        cache = KVCache.init(cfg.text, k, tb, module.dtype)
        out = module.apply({"params": params}, ids, pixel_values, mask, cache=cache, last_token_only=True,
                           image_valid=image_valid)
        tokens = select_slot_tokens(out.logits[:, -1], temperature, top_p, seeds, jnp.zeros((k,), jnp.int32))
        # The prompt's Tb slots end at the write index, wrapping around the ring: only those positions of each
        # row are written (the row's other keys and values stay, masked out: a masked slot's weight is exactly 0).
        pos = (state.cache.index - tb + jnp.arange(tb)) % s  # [Tb]

        def put(big, small):  # big [B, K, S, H] <- small [k, K, Tb, H] at rows `slots`, positions `pos`
            return big.at[slots[:, None], :, pos[None, :]].set(small.swapaxes(1, 2).astype(big.dtype), mode="drop")

        c = state.cache  # k, v [B, K, S, H]; mask [B, S]
        rows = jnp.zeros((k, s), c.mask.dtype).at[:, pos].set(out.cache.mask)
        ring = c.replace(k=tuple(put(a, b) for a, b in zip(c.k, out.cache.k)),
                         v=tuple(put(a, b) for a, b in zip(c.v, out.cache.v)),
                         mask=c.mask.at[slots].set(rows, mode="drop"))
        n = jnp.sum(mask, axis=1).astype(jnp.int32)

        def set_(a, x):
            return a.at[slots].set(x, mode="drop")

        state = state.replace(cache=ring, last=set_(state.last, tokens), positions=set_(state.positions, n),
                              steps=set_(state.steps, jnp.ones((k,), jnp.int32)), seeds=set_(state.seeds, seeds),
                              temperature=set_(state.temperature, temperature), top_p=set_(state.top_p, top_p))
        return state, tokens

    return admit


def _decode_fn(module, chunk: int, rows: int):
    """Up to ``chunk`` decode steps for the first ``rows`` slots (a bucket holding every busy slot): those rows of
    the state are sliced out once, decoded, and written back, so a lightly loaded engine pays for few rows. The
    loop ends early once every active row is done: it drew one of its ``eos`` ids [B, E] (-1 pads) or its
    ``budget`` [B] of tokens (a short answer does not pay for a whole chunk). Returns the state and the tokens
    [rows, chunk], -1 after the last step run."""
    def decode(params, state: SlotState, active, budget, eos):
        s_max = state.cache.max_len
        full = state
        if rows < state.last.shape[0]:
            state = jax.tree.map(lambda a: a[:rows] if a.ndim else a, state)
            active, budget, eos = active[:rows], budget[:rows], eos[:rows]

        def body(carry):
            i, s, live, toks = carry
            out = module.apply({"params": params}, s.last[:, None], None, active[:, None].astype(jnp.int32),
                               position_ids=s.positions[:, None], cache=s.cache)
            tok = select_slot_tokens(out.logits[:, -1], s.temperature, s.top_p, s.seeds, s.steps)
            tok = jnp.where(active, tok, 0)
            # Steps past a row's end (within a chunk) are dropped on the host; their positions are held below
            # the cache length so no RoPE variant sees a position beyond the context.
            pos = jnp.where(active, jnp.minimum(s.positions + 1, s_max - 1), 0)
            live = live & ~jnp.any(tok[:, None] == eos, axis=1) & (i + 1 < budget)
            toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
            return i + 1, s.replace(cache=out.cache, last=tok, positions=pos, steps=s.steps + 1), live, toks

        carry = (jnp.int32(0), state, active & (budget > 0), jnp.full((rows, chunk), -1, jnp.int32))
        _, state, _, toks = jax.lax.while_loop(lambda c: (c[0] < chunk) & jnp.any(c[2]), body, carry)
        if rows < full.last.shape[0]:
            state = jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice(a, b, (0,) * a.ndim) if a.ndim else b,
                                 full, state)
        return state, toks

    return decode


def serving_rules(rules=LOGICAL_AXIS_RULES) -> tuple:
    """The engine's logical-axis rules on a mesh: ``rules`` with the batch axes replicated. The slots are not
    split over data/fsdp (a decode chunk slices the busy rows out); weights and the cache's kv heads are sharded
    as the rules say, so a model too big for one device serves from several (tensor / fsdp)."""
    return tuple((name, None if name in ("batch", "cache_batch") else axes) for name, axes in rules)


@functools.lru_cache(maxsize=16)
def _compiled(module, batch: int, max_len: int, chunk: int, rows: tuple[int, ...], mesh=None, rules=None):
    """(init, admit, {rows: decode}) jitted, shared by engines of the same model and shapes (tests start several).
    ``rows``: the decode row buckets. With a mesh: the state's shardings are explicit (the cache's kv heads as
    the rules say, every other leaf replicated); the other inputs come placed (params as loaded, host arrays
    replicated), and every call runs inside the mesh and ``rules`` (`_MeshJit`)."""
    if mesh is None:
        return (jax.jit(_init_fn(module, batch, max_len)), jax.jit(_admit_fn(module), donate_argnums=(1,)),
                {r: jax.jit(_decode_fn(module, chunk, r), donate_argnums=(1,)) for r in rows})
    rep = NamedSharding(mesh, P())
    cache = cache_shardings(module.config, mesh, rules).replace(ring=True)
    state = SlotState(cache=cache, last=rep, positions=rep, steps=rep, seeds=rep, temperature=rep, top_p=rep)
    return (_MeshJit(_init_fn(module, batch, max_len), mesh, rules, out_shardings=state),
            _MeshJit(_admit_fn(module), mesh, rules, out_shardings=(state, rep), donate_argnums=(1,)),
            {r: _MeshJit(_decode_fn(module, chunk, r), mesh, rules, out_shardings=(state, rep), donate_argnums=(1,))
             for r in rows})


class _MeshJit:
    """jax.jit called inside the mesh and the logical-axis rules (so the model's constraints apply)."""

    def __init__(self, fn, mesh, rules, **jit_kw):
        self.mesh, self.rules = mesh, rules
        self._jit = jax.jit(fn, **jit_kw)

    def __call__(self, *args):
        with mesh_context(self.mesh, self.rules):
            return self._jit(*args)

    def _cache_size(self) -> int:
        return self._jit._cache_size()


# --- requests ---------------------------------------------------------------------------------------------------
class Request:
    """A handle on one submitted prompt (see the module docstring). Created by `Engine.submit`."""

    def __init__(self, rid: int, ids: np.ndarray, pixel_values, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, eos: tuple[int, ...], stop, on_update):
        self.id = rid
        self.prompt_ids = ids  # [n] int32, the real tokens
        self.prompt_tokens = int(ids.shape[0])
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._pixels = pixel_values
        self._eos = eos
        self._stop = stop  # StopStrings or None
        self._stop_state = None if stop is None else stop.initial_state(ids[None], None)[0]
        self._on_update = on_update
        self._tokens: list[int] = []
        self._q: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = False
        self.slot: int | None = None  # the decode slot it ran in (set at admission)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    # -- consumer side
    def __iter__(self) -> Iterator[int]:
        for delta in self.deltas():
            yield from delta

    def deltas(self, timeout: float | None = None) -> Iterator[list[int]]:
        """The new token ids, one list per decode chunk, until the request finishes. ``timeout``: seconds to
        wait for each list (queue.Empty when it passes)."""
        while True:
            item = self._q.get(timeout=timeout)
            if item is None:
                self._q.put(None)  # later iterations end at once too
                return
            yield item

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        """All token ids once the request has finished (TimeoutError if it has not within ``timeout``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished within {timeout} s")
        if self.finish_reason == "error":
            raise RequestFailed(f"request {self.id} failed: {self.error}") from self.error
        return list(self._tokens)

    def cancel(self) -> None:
        """Stop generating: a queued request ends at once, a running one at the next chunk boundary."""
        self._cancel = True
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine._wake()

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def completion_tokens(self) -> int:
        return len(self._tokens)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def __repr__(self):
        return (f"Request(id={self.id}, prompt_tokens={self.prompt_tokens}, completion_tokens="
                f"{self.completion_tokens}, finish_reason={self.finish_reason!r})")

    # -- engine side (engine thread only)
    def _deliver(self, new: list[int], finish: str | None = None, error: BaseException | None = None):
        if new:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._tokens.extend(new)
            self._q.put(list(new))
        if finish is not None:
            self.finish_reason, self.error = finish, error
            self.finished_at = time.monotonic()
            self._q.put(None)
            self._done.set()
        if self._on_update is not None and (new or finish is not None):
            try:
                self._on_update(self, list(new), finish is not None)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
                log.exception("on_update callback of request %d raised", self.id)

    def _accept(self, tokens) -> tuple[list[int], str | None]:
        """The tokens of this request among ``tokens`` (in order) and its finish reason, if it ends here."""
        out: list[int] = []
        for t in tokens:
            t = int(t)
            out.append(t)
            if t in self._eos:
                return out, "stop"
            if self._stop is not None:
                st = self._stop
                m = np.arange(len(st.strings))
                hit = bool(st.hit[m, self._stop_state, t].any())
                self._stop_state = st.next_state[m, self._stop_state, t]
                if hit:
                    return out, "stop"
            if len(self._tokens) + len(out) >= self.max_new_tokens:
                return out, "length"
        return out, None


@dataclasses.dataclass
class Plan:
    """What the device does at one chunk boundary: the requests to admit (slot, request; prefilled in order)
    and which slots decode the next chunk. Host-only bookkeeping (cancellations, finished slots) is already done
    when a plan is made. The unit a multi-host leader would broadcast to its followers."""

    admit: list[tuple[int, Request]]
    active: np.ndarray  # [max_batch] bool


# --- the engine -------------------------------------------------------------------------------------------------
class Engine:
    """Continuous batching on one device (see the module docstring)."""

    def __init__(self, module, params, processor=None, *, max_batch: int = 16, max_model_len: int | None = None,
                 chunk: int = 8, mesh=None, prefill_buckets: Sequence[int] | None = None,
                 image_buckets: Sequence[int] | None = None, batch_buckets: Sequence[int] | None = None,
                 max_queue: int = 64, rules=LOGICAL_AXIS_RULES, channel=None):
        module, params = _unscanned(module, params)
        self.mesh, self.rules = mesh, None if mesh is None else serving_rules(rules)
        if mesh is not None and jax.tree.structure(params) == jax.tree.structure(
                param_shardings(module.config, mesh, rules=self.rules)):
            params = shard_params(params, module.config, mesh, self.rules)  # no-op when loaded with mesh=
        self._channel = channel  # multi-host: process 0's engine sends every device call to the followers
        self.module, self.params, self.processor = module, params, processor
        cfg = module.config
        self.max_batch = check_count(max_batch, "max_batch")
        self.chunk = check_count(chunk, "chunk")
        self.max_queue = check_count(max_queue, "max_queue")
        ctx = cfg.text.max_position_embeddings
        self.max_model_len = ctx if max_model_len is None else check_count(max_model_len, "max_model_len")
        if self.max_model_len > ctx:
            raise ValueError(f"max_model_len={self.max_model_len} is longer than the model's context of {ctx} "
                             f"tokens (max_position_embeddings)")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 (a prompt token and a new one), got "
                             f"{self.max_model_len}")
        s = self.max_model_len
        if prefill_buckets is None:
            b, buckets = 16, []
            while b < s:
                buckets.append(b)
                b *= 2
            prefill_buckets = buckets + [s]
        self.prefill_buckets = tuple(sorted({check_count(b, "prefill bucket") for b in prefill_buckets}))
        if self.prefill_buckets[-1] > s:
            raise ValueError(f"prefill buckets {self.prefill_buckets} go past max_model_len={s}")
        if self.prefill_buckets[-1] < s - 1:
            self.prefill_buckets += (s,)  # every prompt that fits must have a bucket
        ib = (0, 1) if image_buckets is None else image_buckets
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in ib):
            raise ValueError(f"image_buckets must be non-negative integers, got {list(ib)}")
        self.image_buckets = tuple(sorted({int(i) for i in ib} | {0}))
        if batch_buckets is None:  # 1, 4, 16, ... and max_batch
            b, batch_buckets = 1, []
            while b < self.max_batch:
                batch_buckets.append(b)
                b *= 4
        self.batch_buckets = tuple(sorted({check_count(b, "batch bucket") for b in batch_buckets} | {self.max_batch}))
        if self.batch_buckets[-1] > self.max_batch:
            raise ValueError(f"batch buckets {self.batch_buckets} go past max_batch={self.max_batch}")
        # Prompts prefilled together: K rows of a Tb bucket only while K x Tb stays within this many tokens (long
        # prompts are admitted in small groups: bounded activation memory and fewer programs to compile).
        self.prefill_tokens = max(2048, s)
        self.image_seq_length = cfg.image_seq_length
        vc = cfg.vision
        self.pixel_shape = (vc.num_channels, vc.image_size, vc.image_size)
        self.eos = eos_ids(cfg, processor.eos_token_id if processor is not None else None)
        self.eos_width = max(4, len(self.eos))  # EOS ids per row a decode chunk checks (a request's first ones)
        pad = pad_id(cfg, processor.pad_token_id if processor is not None else None, self.eos)
        self.pad = 0 if pad == cfg.image_token_index else pad

        self._init, self._admit, self._decode = _compiled(module, self.max_batch, s, self.chunk, self.batch_buckets,
                                                          mesh, self.rules)
        self._state: SlotState | None = None
        self._slots: list[Request | None] = [None] * self.max_batch
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline: float | None = None
        self._next_id = 0
        self._following = False
        self.ready = False
        self._ready_event = threading.Event()
        self.error: BaseException | None = None
        self._counts = {"chunks": 0, "admitted": 0, "admit_calls": 0, "tokens": 0}

    # -- public ------------------------------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> "Engine":
        """Start the engine thread (warm-up first when ``warmup``); returns at once."""
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("the engine was already started")
            if self._stopping:
                raise EngineStopped("the engine was stopped")
            self._thread = threading.Thread(target=self._main, args=(warmup,), name="vipllava-engine",
                                            daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready_event.wait(timeout)
        return self.ready

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting requests, let the accepted ones finish for up to ``grace_s`` seconds, cancel the rest
        and end the engine thread (returns when it has ended)."""
        with self._cv:
            self._stopping = True
            self._deadline = time.monotonic() + max(0.0, float(grace_s))
            self._cv.notify_all()
            thread = self._thread
        if thread is None:  # never started: nothing runs, the queued requests are cancelled
            with self._cv:
                while self._queue:
                    self._queue.popleft()._deliver([], "cancelled")
            return
        thread.join()

    def submit(self, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               eos_token_id=None, on_update: Callable | None = None) -> Request:
        """Queue one prompt; see the module docstring."""
        cfg = self.module.config
        check_token_ids(input_ids, cfg.text.vocab_size)
        ids = np.asarray(input_ids)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"submit takes one prompt ([T] or [1, T]), got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"input_ids must be [T] or [1, T], got shape {np.shape(input_ids)}")
        if attention_mask is not None:
            m = np.asarray(attention_mask).reshape(-1)
            if m.shape != ids.shape or not np.isin(m, (0, 1)).all():
                raise ValueError(f"attention_mask must be 0/1 of input_ids' shape {ids.shape}")
            if m.size and m[-1] == 0:
                raise ValueError("the prompt ends in padding: give it left padded (padding_side='left')")
            ids = ids[m.astype(bool)]
        ids = ids.astype(np.int32)
        n, s = int(ids.shape[0]), self.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > s - 1:
            raise ValueError(f"The prompt is {n} tokens long, but this engine's max_model_len is {s}: a prompt can "
                             f"have at most {s - 1} tokens (max_model_len - 1) to leave room for a new one")
        n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0]) if np.ndim(pixel_values) else -1
        if n_images < 0:
            raise ValueError(f"pixel_values must be [I, 3, H, W], got shape {np.shape(pixel_values)}")
        if n_images > self.image_buckets[-1]:
            raise ValueError(f"{n_images} images in one request, but this engine takes at most "
                             f"{self.image_buckets[-1]} (image_buckets={self.image_buckets})")
        if n_images or np.any(ids == cfg.image_token_index):
            err = image_token_mismatch(ids[None], n_images, cfg.image_token_index, cfg.image_seq_length)
            if err:
                raise ValueError(err)
        room = s - n
        new = room if max_new_tokens is None else min(check_count(max_new_tokens, "max_new_tokens"), room)
        temperature, top_p = float(temperature), float(top_p)
        if not (temperature >= 0.0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        seed = secrets.randbelow(2**31) if seed is None else check_seed(seed)
        eos = self.eos if eos_token_id is None else eos_ids(cfg, eos_token_id)
        stop = tuple(stop)
        tables = None
        if stop:
            if self.processor is None:
                raise ValueError("stop strings need the engine's processor (its tokenizer)")
            tables = stop_strings_for(self.processor.tokenizer, stop, cfg.text.vocab_size)
        with self._cv:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise EngineStopped("the engine is stopped: it takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait for a slot (max_queue={self.max_queue})")
            req = Request(self._next_id, ids, pixel_values, new, temperature, top_p, seed, eos, tables, on_update)
            req._engine = self
            self._next_id += 1
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def stats(self) -> dict:
        with self._cv:
            running = sum(r is not None for r in self._slots)
            return {"ready": self.ready, "running": running, "queued": len(self._queue),
                    "free_slots": self.max_batch - running, **self._counts, "compiled": self.compile_count()}

    def compile_count(self) -> int:
        """Programs compiled so far by the engine's jitted functions (shared by engines of the same shapes)."""
        return sum(f._cache_size() for f in (self._init, self._admit, *self._decode.values()))

    # -- device calls (the same on every process of a multi-host engine) -------------------------------------------
    def _placed(self, args) -> tuple:
        """Host arrays as the jitted calls take them: as they are on one device; on a mesh, replicated global
        arrays (every process holds the same values: the leader's plan)."""
        if self.mesh is None:
            return args
        rep = NamedSharding(self.mesh, P())
        return tuple(None if a is None else put_global(np.asarray(a), rep) for a in args)

    def _run(self, kind: str, *args):
        """One device call on the state: ("init",), ("admit", packed args) or ("decode", rows, active, budget,
        eos) (`_decode_args`). The leader of a multi-host engine sends it to the followers first. Returns the
        call's tokens (or None)."""
        if self._channel is not None and not self._following:
            self._channel.send((kind,) + args)
        if kind == "init":
            self._state, toks = self._init(), None
        elif kind == "admit":
            self._state, toks = self._admit(self.params, self._state, *self._placed(args[0]))
        elif kind == "decode":
            self._state, toks = self._decode[args[0]](self.params, self._state, *self._placed(args[1:]))
        elif kind != "noop":
            raise ValueError(f"unknown engine call {kind!r}")
        else:
            toks = None
        return toks

    @staticmethod
    def _host(x) -> np.ndarray:
        """A replicated result on the host (on a multi-host mesh: this process's copy)."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    def follow(self, warmup: bool = True) -> None:
        """Multi-host serving, on every process but 0: build the same Engine with ``channel=`` (the same
        arguments as process 0's), then call this instead of `start`. It warms up as the leader does, then runs
        each device call the leader sends, on its own devices' shards, until the leader stops. Returns then."""
        if self._channel is None:
            raise ValueError("follow() needs the engine's channel (Engine(..., channel=BroadcastChannel()))")
        self._following = True
        self._state = self._init()
        if warmup:
            self._warmup()
        self.ready = True
        self._ready_event.set()
        while True:
            msg = self._channel.recv()
            if msg[0] == "stop":
                return
            try:
                self._run(*msg)
            except Exception:  # noqa: BLE001 - the leader's same call fails too; it decides what happens next
                log.exception("follower: engine call %r failed", msg[0])

    # -- engine thread -----------------------------------------------------------------------------------------
    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _main(self, warmup: bool):
        try:
            self._state = self._init()  # not sent: every process starts and warms up alike on its own
            if warmup:
                self._warmup()
            self.ready = True
            self._ready_event.set()
            while True:
                plan = self._plan()
                if plan is None:
                    break
                self._execute(plan)
        except BaseException as e:  # noqa: BLE001 - the engine dies: fail every request, say why
            log.exception("the engine thread failed")
            self.error = e
            with self._cv:
                self._stopping = True
                pending = [r for r in self._slots if r is not None] + list(self._queue)
                self._slots = [None] * self.max_batch
                self._queue.clear()
            for r in pending:
                r._deliver([], "error", e)
        finally:
            self._ready_event.set()
            if self._channel is not None:
                try:
                    self._channel.send(("stop",))
                except Exception:  # noqa: BLE001
                    log.exception("could not tell the followers to stop")

    def _warmup(self):
        """Run every program once: admit for each (length bucket, image bucket, batch bucket) that can hold a
        prompt with that many images (its rows all padding, so the state is untouched), and the decode chunk of
        each row bucket (all slots inactive)."""
        cfg = self.module.config
        for tb in self.prefill_buckets:
            for ni in self.image_buckets:
                need = ni * self.image_seq_length + 1 if ni else 1
                if need > tb:
                    continue
                ids = np.full((need,), self.pad, np.int32)
                if ni:
                    ids[1:] = cfg.image_token_index
                pix = np.zeros((ni,) + self.pixel_shape, np.float32) if ni else None
                for k in self.batch_buckets:
                    if k > 1 and k * tb > self.prefill_tokens:
                        continue
                    args = self._pack([(self.max_batch, ids, pix, 0, 0.0, 1.0)] * k, tb=tb, ib=ni)
                    self._state, tok = self._admit(self.params, self._state, *self._placed(args))
        idle = self._decode_args(np.zeros((self.max_batch,), bool))
        for rows in self.batch_buckets:  # compiles each; runs no step (no row is active)
            self._state, toks = self._decode[rows](self.params, self._state, *self._placed(idle))
        jax.block_until_ready(toks)

    def _plan(self) -> Plan | None:
        """Every scheduling decision of one chunk boundary, under the lock: cancelled requests leave their slots,
        queued ones take free slots (FIFO), the stop's deadline is applied. None: the engine ends."""
        idle_since = time.monotonic()
        with self._cv:
            while True:
                for i, r in enumerate(self._slots):
                    if r is not None and r._cancel:
                        self._slots[i] = None
                        r._deliver([], "cancelled")
                for r in [r for r in self._queue if r._cancel]:
                    self._queue.remove(r)
                    r._deliver([], "cancelled")
                busy = any(r is not None for r in self._slots) or bool(self._queue)
                if self._stopping and (not busy or time.monotonic() >= self._deadline):
                    for i, r in enumerate(self._slots):
                        if r is not None:
                            self._slots[i] = None
                            r._deliver([], "cancelled")
                    while self._queue:
                        self._queue.popleft()._deliver([], "cancelled")
                    return None
                if busy:
                    break
                timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
                if self._channel is not None:  # multi-host: an empty plan (a heartbeat) every HEARTBEAT_S idle
                    left = HEARTBEAT_S - (time.monotonic() - idle_since)
                    if left <= 0:
                        return Plan([], np.zeros((self.max_batch,), bool))
                    timeout = left if timeout is None else min(timeout, left)
                self._cv.wait(timeout=timeout)
            admit = []
            for i in range(self.max_batch):
                if self._slots[i] is None and self._queue:
                    r = self._queue.popleft()
                    self._slots[i] = r
                    r.slot = i
                    admit.append((i, r))
            active = np.array([r is not None for r in self._slots], bool)
            return Plan(admit, active)

    def _pixels(self, r: Request) -> np.ndarray | None:
        """The request's images as float32 [I, 3, H, W] (None without images), checked."""
        if r._pixels is None or not np.shape(r._pixels)[0]:
            return None
        p = np.asarray(r._pixels)
        if p.ndim != 4 or p.shape[1:] != self.pixel_shape:
            raise ValueError(f"pixel_values must be [I, {', '.join(map(str, self.pixel_shape))}] (this model's "
                             f"vision tower), got shape {p.shape}")
        if p.dtype.kind not in "fiu":
            raise ValueError(f"pixel_values must hold numbers, got dtype {p.dtype}")
        p = p.astype(np.float32)
        if not np.isfinite(p).all():
            raise ValueError("pixel_values hold NaN or infinite values")
        return p

    def _decode_args(self, active: np.ndarray) -> tuple:
        """A decode chunk's host arguments: ``active`` [B] bool, ``budget`` [B] int32 (the tokens each active
        request may still take) and ``eos`` [B, E] int32 (its first E EOS ids, -1 padded). A row the device
        finds done (an EOS or its budget) is done on the host too: the chunk may end early; stop strings are the
        host's alone."""
        budget = np.zeros((self.max_batch,), np.int32)
        eos = np.full((self.max_batch, self.eos_width), -1, np.int32)
        for slot in np.nonzero(active)[0]:
            r = self._slots[slot]
            if r is None:
                continue
            budget[slot] = max(0, r.max_new_tokens - len(r._tokens))
            ids = r._eos[:self.eos_width]
            eos[slot, :len(ids)] = ids
        return active, budget, eos

    def _pack(self, entries, tb: int | None = None, ib: int | None = None) -> tuple:
        """The admit call's arguments for ``entries`` [(slot, prompt ids [n], images [I, ...] or None, seed,
        temperature, top_p)]: prompts left padded to one length bucket, rows padded to a batch bucket (slot B:
        dropped), images in row order then padding to K x the image bucket, ``image_valid`` marking the real."""
        n = max(len(e[1]) for e in entries)
        tb = tb or next(b for b in self.prefill_buckets if b >= n)
        ni = max(0 if e[2] is None else e[2].shape[0] for e in entries)
        ib = next(b for b in self.image_buckets if b >= ni) if ib is None else ib
        k = next(b for b in self.batch_buckets if b >= len(entries))
        assert k == 1 or k * tb <= self.prefill_tokens, (k, tb)
        ids = np.full((k, tb), self.pad, np.int32)
        mask = np.zeros((k, tb), np.int32)
        mask[:, -1] = 1  # padding rows: one pad token (never an all-masked row)
        slots = np.full((k,), self.max_batch, np.int32)
        seeds, temps, top_p = np.zeros((k,), np.int32), np.zeros((k,), np.float32), np.ones((k,), np.float32)
        images = []
        for i, (slot, pid, pix, seed, temperature, p) in enumerate(entries):
            ids[i, tb - len(pid):] = pid
            mask[i] = 0
            mask[i, tb - len(pid):] = 1
            slots[i], seeds[i], temps[i], top_p[i] = slot, seed, temperature, p
            if pix is not None:
                images.append(pix)
        pix = valid = None
        if ib:
            real = np.concatenate(images) if images else np.zeros((0,) + self.pixel_shape, np.float32)
            pix = np.zeros((k * ib,) + self.pixel_shape, np.float32)
            pix[:len(real)] = real
            valid = np.arange(k * ib) < len(real)
        return ids, pix, mask, valid, slots, seeds, temps, top_p

    def _admit_group(self, group) -> list:
        """Prefill ``group`` [(slot, request)] in as few calls as the batch buckets and the prefill token budget
        allow; returns [(the call's slots, their first tokens [K] on device)]. A request failing its checks fails
        alone; a failed call fails its rows."""
        entries = []
        for slot, r in group:
            try:
                entries.append(((slot, r.prompt_ids, self._pixels(r), r.seed, r.temperature, r.top_p), r))
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                log.warning("request %d failed at admission: %s", r.id, e)
                self._free(slot, r, "error", e)
        parts, part = [], []
        for e in entries:  # FIFO groups, each within the prefill token budget at its length bucket
            n = max([len(e[0][1])] + [len(x[1]) for x, _ in part])
            tb = next(b for b in self.prefill_buckets if b >= n)
            k = next((b for b in self.batch_buckets if b >= len(part) + 1), None)
            if part and (k is None or k * tb > self.prefill_tokens):
                parts.append(part)
                part = []
            part.append(e)
        if part:
            parts.append(part)
        out = []
        for part in parts:
            try:
                toks = self._run("admit", self._pack([e for e, _ in part]))
            except Exception as e:  # noqa: BLE001
                log.warning("admission of %d requests failed: %s", len(part), e)
                for (slot, *_), r in part:
                    self._free(slot, r, "error", e)
                self._check_state()
                continue
            out.append(([e[0] for e, _ in part], toks))  # indexed on the host (an eager index compiles)
            self._counts["admitted"] += len(part)
            self._counts["admit_calls"] += 1
        return out

    def _execute(self, plan: Plan):
        firsts = self._admit_group(plan.admit)
        if firsts:  # the first tokens go out now, before the chunk (time to first token); some requests end here
            first_host = [self._host(t) for _, t in firsts]
            self._deliver({slot: [int(t)] for (slots, _), ts in zip(firsts, first_host) for slot, t in zip(slots, ts)})
        with self._cv:
            active = np.array([r is not None for r in self._slots], bool) & plan.active
        if not active.any():
            if not plan.admit and self._channel is not None:
                self._run("noop")  # the followers' heartbeat while idle
            return
        rows = next(b for b in self.batch_buckets if b > int(np.nonzero(active)[0][-1]))
        try:
            toks = self._host(self._run("decode", rows, *self._decode_args(active)))
        except Exception as e:  # noqa: BLE001 - a failed chunk fails the running requests, the engine goes on
            log.exception("decode chunk failed")
            for slot, r in enumerate(self._slots):
                if r is not None:
                    self._free(slot, r, "error", e)
            self._check_state()
            return
        self._counts["chunks"] += 1
        self._deliver({int(slot): [t for t in toks[slot].tolist() if t >= 0] for slot in np.nonzero(active)[0]})

    def _deliver(self, by_slot: dict[int, list[int]]):
        """Hand each slot's new tokens to its request (up to its end: EOS, a stop string, max_new_tokens); a
        request that ends leaves its slot."""
        for slot, seq in by_slot.items():
            r = self._slots[slot]
            if r is None:
                continue
            new, finish = r._accept(seq)
            self._counts["tokens"] += len(new)
            if finish is not None:
                with self._cv:
                    self._slots[slot] = None
            r._deliver(new, finish)

    def _free(self, slot: int, r: Request, finish: str, error: BaseException | None = None):
        with self._cv:
            if self._slots[slot] is r:
                self._slots[slot] = None
        r._deliver([], finish, error)

    def _check_state(self):
        """After a failed device call: if the donated state was consumed, start from a fresh one (the running
        requests lose their caches, so they fail)."""
        if any(x.is_deleted() for x in jax.tree.leaves(self._state)):
            err = RuntimeError("the engine's device state was lost in a failed call")
            for slot, r in enumerate(self._slots):
                if r is not None:
                    self._free(slot, r, "error", err)
            self._run("init")
