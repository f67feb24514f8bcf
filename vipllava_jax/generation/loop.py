"""Batched generation: a jit-compiled prefill into an explicit KV cache, then the whole decode loop on the device.

Shapes: B batch, T prompt length (bucketed), N new tokens, S cache slots (T + N), V vocab, M stop strings,
L longest stop string.

* ``prefill`` (one jit): vision tower, projector and the prompt through the decoder; it creates the KV cache
  inside the jit (no host-side zeros to copy) and picks the first new token.
* ``decode`` (one jit): a ``lax.while_loop`` over `DecodeState`, one token per step, with the state (and the
  KV cache in it) donated, so the cache is updated in place. It stops when every row is done or at a step
  limit that is a traced scalar: ``generate`` runs it once to the end, ``generate_stream`` runs it a few
  steps at a time with the same compiled function.
* Prompts are left padded to a bucketed length (4 buckets per octave), so a new prompt length rarely
  recompiles. Positions come from the attention mask, so the extra padding does not change the numbers.
* Layers stacked for ``nn.scan`` are unstacked once before decoding: slicing stacked weights inside every
  decode step is several times slower (measured on an H100, see the README).

Logits processors: `sampling.py`; stop strings: `stop_strings.py`; prompt checks and buckets: `inputs.py`;
the public functions: `api.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from ..models.llama import KVCache
from ..models.params import relayout
from ..models.vipllava import VipLlavaForConditionalGeneration
from ..parallel import shardings as sh
from ..parallel.jit import jit_sharded
from ..parallel.mesh import batch_divisor
from ..parallel.rules import LOGICAL_AXIS_RULES
from .config import GenerationConfig
from .inputs import bucket_length, check_seed, eos_ids, pad_id, prepare
from .sampling import SamplingConfig, select_tokens
from .stop_strings import StopStrings, stop_step

Array = jax.Array


@struct.dataclass
class DecodeState:
    step: Array  # [] int32: new tokens written so far
    tokens: Array  # [B, N] int32, pad after a row is done
    last: Array  # [B] int32: the newest token (the next decode input)
    positions: Array  # [B] int32: RoPE position of `last`
    done: Array  # [B] bool
    seen: Array | None  # [B, V] bool: tokens in the sequence (repetition penalty only)
    stop: Array  # [B, M] int32 stop-string automaton state
    key: Array  # PRNG key
    cache: KVCache


@dataclasses.dataclass(frozen=True)
class _Static:
    sampling: SamplingConfig
    max_new_tokens: int  # capacity: the requested count rounded up to a bucket (the real limit is traced)
    eos: tuple[int, ...]
    pad: int


def _record(st: _Static, tables, state: DecodeState, token: Array) -> DecodeState:
    """Write `token` [B] as new token number state.step (pad for rows already done) and update stop flags."""
    token = jnp.where(state.done, st.pad, token)
    stop, stop_hit = stop_step(tables, state.stop, token)
    done = state.done | jnp.isin(token, jnp.asarray(st.eos or (-1,), jnp.int32)) | stop_hit
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    seen = None if state.seen is None else state.seen.at[jnp.arange(token.shape[0]), token].set(True)
    return state.replace(step=state.step + 1, tokens=tokens, last=token, done=done, seen=seen,
                         stop=jnp.where(state.done[:, None], state.stop, stop))


def _prefill_fn(module, st: _Static, cache_len: int):
    cfg = module.config

    def prefill(params, input_ids, pixel_values, attention_mask, seed, stop0, tables) -> DecodeState:
        b = input_ids.shape[0]
        key = jax.random.key(seed)
        cache = KVCache.init(cfg.text, b, cache_len, module.dtype, scan_layers=module.runtime.scan_layers)
        out = module.apply({"params": params}, input_ids, pixel_values, attention_mask, cache=cache,
                           last_token_only=True)
        seen = None
        if st.sampling.uses_seen:
            seen = jnp.zeros((b, out.logits.shape[-1]), jnp.int32)
            seen = seen.at[jnp.arange(b)[:, None], input_ids].max(attention_mask.astype(jnp.int32)) > 0
        state = DecodeState(
            step=jnp.zeros((), jnp.int32), tokens=jnp.full((b, st.max_new_tokens), st.pad, jnp.int32),
            last=jnp.zeros((b,), jnp.int32), positions=jnp.sum(attention_mask, axis=-1).astype(jnp.int32) - 1,
            done=jnp.zeros((b,), bool), seen=seen, stop=stop0, key=key, cache=out.cache)
        token = select_tokens(out.logits[:, -1], seen, jax.random.fold_in(key, 0), st.sampling)
        state = _record(st, tables, state, token)
        return state.replace(positions=state.positions + 1)

    return prefill


def _decode_fn(module, st: _Static):
    def decode(params, state: DecodeState, limit, tables) -> DecodeState:
        limit = jnp.minimum(limit, st.max_new_tokens)

        def cond(s):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s):
            b = s.last.shape[0]
            out = module.apply({"params": params}, s.last[:, None], None, jnp.ones((b, 1), jnp.int32),
                               position_ids=s.positions[:, None], cache=s.cache)
            s = s.replace(cache=out.cache)
            token = select_tokens(out.logits[:, -1], s.seen, jax.random.fold_in(s.key, s.step), st.sampling)
            s = _record(st, tables, s, token)
            return s.replace(positions=s.positions + 1)

        return jax.lax.while_loop(cond, body, state)

    return decode


@functools.lru_cache(maxsize=64)
def _compiled(module, st: _Static, cache_len: int, pixels: str | None, mesh=None, rules=None):
    """(prefill, decode) jitted; with a mesh, with explicit shardings from the rules table."""
    prefill, decode = _prefill_fn(module, st, cache_len), _decode_fn(module, st)
    if mesh is None:
        return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))
    cfg, scan = module.config, module.runtime.scan_layers
    rep = NamedSharding(mesh, P())
    ps = sh.param_shardings(cfg, mesh, scan_layers=scan, rules=rules)
    row = sh.logical_to_sharding(("batch",), mesh, rules)
    row2 = sh.logical_to_sharding(("batch", None), mesh, rules)
    state_s = DecodeState(step=rep, tokens=sh.io_sharding("tokens", mesh, rules), last=row, positions=row,
                          done=row, seen=row2 if st.sampling.uses_seen else None, stop=row2, key=rep,
                          cache=sh.cache_shardings(cfg, mesh, rules, scan_layers=scan))
    ids_s, mask_s = sh.io_sharding("input_ids", mesh, rules), sh.io_sharding("attention_mask", mesh, rules)
    # pixel_values: split like the batch when the image count divides, else replicated
    pix_s = {None: None, "split": sh.io_sharding("pixel_values", mesh, rules),
             "replicated": rep}[pixels]
    j_prefill = jit_sharded(prefill, mesh, in_shardings=(ps, ids_s, pix_s, mask_s, rep, row2, rep),
                               out_shardings=state_s, rules=rules)
    j_decode = jit_sharded(decode, mesh, in_shardings=(ps, state_s, rep, rep), out_shardings=state_s,
                              rules=rules, donate_argnums=(1,))
    return j_prefill, j_decode


def _unscanned(module, params):
    """Generation uses unrolled layers: the decode loop must not re-slice stacked weights every step."""
    if not module.runtime.scan_layers:
        return module, params
    warnings.warn("generating with scanned (stacked) layers: each call unstacks a copy of the weights; load with "
                  "scan_layers=False (the default) for inference", stacklevel=4)
    module = VipLlavaForConditionalGeneration(module.config, module.runtime.replace(scan_layers=False, remat_policy="none"),
                                              module.dtype)
    return module, relayout(params, scan_layers=False)


class Run:
    """One generation: prefill once, then `advance(limit)` runs the on-device loop up to `limit` tokens."""

    def __init__(self, module, params, input_ids, pixel_values, attention_mask, config: GenerationConfig, *,
                 mesh=None, rules=None):
        sampling = config.sampling
        max_new_tokens, bucket, stop_strings = config.max_new_tokens, config.bucket, config.stop_strings
        module, params = _unscanned(module, params)
        cfg = module.config
        eos = eos_ids(cfg, config.eos_token_id)
        rules = None if mesh is None else tuple(rules or LOGICAL_AXIS_RULES)
        seed = check_seed(config.seed)
        prep = prepare(module, input_ids, pixel_values, attention_mask, max_new_tokens, mesh, rules, bucket)
        # Capacity is bucketed like prompt lengths, so a new max_new_tokens rarely recompiles; the requested
        # count is the loop's traced limit.
        self.n = int(max_new_tokens)
        cap = bucket_length(self.n) if bucket else self.n
        self.st = _Static(sampling, cap, eos, pad_id(cfg, config.pad_token_id, eos))
        if stop_strings is None:
            stop = StopStrings((" ",), np.zeros((1, 1, cfg.text.vocab_size), np.int32),
                               np.zeros((1, 1, cfg.text.vocab_size), bool))
        else:
            stop = stop_strings
            if stop.next_state.shape[2] != cfg.text.vocab_size:
                raise ValueError(f"stop-string tables cover {stop.next_state.shape[2]} tokens but the model's "
                                 f"vocabulary has {cfg.text.vocab_size}; build them with vocab_size="
                                 f"{cfg.text.vocab_size}")
        stop0 = stop.initial_state(prep.ids, prep.mask) if stop_strings is not None else \
            np.zeros((prep.ids.shape[0], 1), np.int32)
        cache_len = prep.ids.shape[1] + cap
        has_pixels = pixel_values is not None
        pix_mode = None
        if has_pixels:
            pix_mode = "replicated"
            if mesh is not None:
                if np.shape(pixel_values)[0] % batch_divisor(mesh, rules) == 0:
                    pix_mode = "split"
        self.prefill, self.decode = _compiled(module, self.st, cache_len, pix_mode, mesh, rules)
        self.tables = (stop.next_state, stop.hit)
        self.b, self.mesh, self.rules = prep.b, mesh, rules
        args = [params, prep.ids, pixel_values, prep.mask, np.asarray(seed, np.int32), stop0]
        if mesh is not None:
            args = self._place(module, args, has_pixels)
        else:
            self.tables = _empty_tables(cfg.text.vocab_size) if stop_strings is None else \
                tuple(jnp.asarray(t) for t in self.tables)
            if has_pixels:
                args[2] = jnp.asarray(pixel_values)
        self.params = args[0]
        self.state = self.prefill(*args, self.tables)

    def _place(self, module, args, has_pixels):
        mesh, rules, cfg = self.mesh, self.rules, module.config
        params = sh.shard_params(args[0], cfg, mesh, rules, scan_layers=module.runtime.scan_layers)
        ids = sh.put_global(args[1], sh.io_sharding("input_ids", mesh, rules))
        pix = None
        if has_pixels:
            pix = sh.put_global(args[2], sh.pixel_sharding(np.shape(args[2])[0], mesh, rules))
        mask = sh.put_global(args[3], sh.io_sharding("attention_mask", mesh, rules))
        seed = sh.put_global(args[4], NamedSharding(mesh, P()))
        stop0 = sh.put_global(args[5], sh.logical_to_sharding(("batch", None), mesh, rules))
        self.tables = tuple(sh.put_global(np.asarray(t), NamedSharding(mesh, P())) for t in self.tables)
        return [params, ids, pix, mask, seed, stop0]

    @property
    def finished(self) -> bool:
        return int(self.state.step) >= self.n or bool(np.all(self._host(self.state.done)))

    def _host(self, x) -> np.ndarray:
        if self.mesh is None:
            return np.asarray(x)
        return sh.to_host(x)

    def advance(self, limit: int) -> None:
        limit = np.asarray(min(int(limit), self.n), np.int32)
        if self.mesh is not None:
            limit = sh.put_global(limit, NamedSharding(self.mesh, P()))
        self.state = self.decode(self.params, self.state, limit, self.tables)

    def tokens(self) -> np.ndarray:
        return self._host(self.state.tokens)[: self.b, : self.n]

    @property
    def step(self) -> int:
        return int(self.state.step)


@functools.lru_cache(maxsize=4)
def _empty_tables(vocab_size: int):
    """Stop-string tables that never fire (no stop strings), kept on the device across calls."""
    return jnp.zeros((1, 1, vocab_size), jnp.int32), jnp.zeros((1, 1, vocab_size), bool)
