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

Logits processors follow HF's order and definitions (``RepetitionPenaltyLogitsProcessor``, then for sampling
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``); they are tested against them.
Stop strings (``"###"`` for the llava_v0 chat format) are matched on the device with a per-token automaton
built once from the tokenizer's vocabulary: a row stops when the stop string ends inside its newest token,
as HF's ``StopStringCriteria`` does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .llama import KVCache
from .vipllava import VipLlavaForConditionalGeneration, check_token_ids, image_token_mismatch

Array = jax.Array

MIN_BUCKET = 16


# --- logits processors (HF semantics) ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (hashable: part of the compiled functions' cache key)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def uses_seen(self) -> bool:
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
    """HF's RepetitionPenaltyLogitsProcessor: for tokens already in the sequence, divide positive logits by the
    penalty and multiply negative ones by it. logits [B, V] float, seen [B, V] bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: Array, temperature: float) -> Array:
    return logits / temperature


def apply_top_k(logits: Array, k: int) -> Array:
    """Keep the k largest logits (ties with the k-th are kept, as in HF), set the rest to -inf."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: Array, p: float) -> Array:
    """Nucleus filtering as HF does it: sort ascending, drop the tokens whose cumulative probability is at most
    1 - p, always keep the most likely one."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: Array, seen: Array | None, sc: SamplingConfig) -> Array:
    """The processor chain HF's generate builds for these settings. logits [B, V] -> [B, V] float32."""
    logits = logits.astype(jnp.float32)
    if sc.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sc.repetition_penalty)
    if sc.do_sample:
        if sc.temperature != 1.0:
            logits = apply_temperature(logits, sc.temperature)
        if sc.top_k:
            logits = apply_top_k(logits, sc.top_k)
        if sc.top_p is not None and sc.top_p < 1.0:
            logits = apply_top_p(logits, sc.top_p)
    return logits


def select_tokens(logits: Array, seen: Array | None, key: Array, sc: SamplingConfig) -> Array:
    """[B, V] logits -> [B] int32 token ids (argmax, or a sample from the processed distribution)."""
    logits = process_logits(logits, seen, sc)
    if sc.do_sample:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# --- stop strings ----------------------------------------------------------------------------------------------
def token_strings(tokenizer, vocab_size: int | None = None, prefix: str = "abcdef") -> list[str]:
    """The text each token id adds when it follows other text, indexed by id (ids the tokenizer lacks -> "").

    ``convert_tokens_to_string`` on a lone token drops sentencepiece's leading space, so each token is rendered
    after a fixed prefix and the prefix is cut off again (the trick HF's StopStringCriteria also uses)."""
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1 if vocab_size is None else vocab_size
    base = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(prefix, add_special_tokens=False)["input_ids"]]
    out = [""] * n
    for tok, i in vocab.items():
        if i >= n:
            continue
        s = tokenizer.convert_tokens_to_string(base + [tok])
        j = s.find(prefix)
        out[i] = s[j + len(prefix):] if j >= 0 else s
    return out


@dataclasses.dataclass(frozen=True)
class StopStrings:
    """Per-token automaton (KMP) for M stop strings over a V-token vocabulary.

    next_state [M, L, V] int32: state after a token (state = how many characters of the stop string the text
    currently ends with); hit [M, L, V] bool: the stop string is completed somewhere inside that token."""

    strings: tuple[str, ...]
    next_state: np.ndarray
    hit: np.ndarray

    @classmethod
    def build(cls, strings: Sequence[str], token_text: Sequence[str]) -> "StopStrings":
        strings = tuple(strings)
        if not strings or any(not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(strings)}")
        v, lmax = len(token_text), max(len(s) for s in strings)
        nxt = np.zeros((len(strings), lmax, v), np.int32)
        hit = np.zeros((len(strings), lmax, v), bool)
        for m, s in enumerate(strings):
            fail = _kmp_failure(s)
            chars = set(s)
            for tid, text in enumerate(token_text):
                if not text:  # an empty token (special tokens, unknown ids) leaves the state alone
                    nxt[m, :, tid] = np.arange(lmax)
                    continue
                if not chars.intersection(text):
                    continue  # state 0, no hit
                for q in range(len(s)):
                    nxt[m, q, tid], hit[m, q, tid] = _kmp_run(s, fail, q, text)
        return cls(strings, nxt, hit)

    @classmethod
    def from_tokenizer(cls, strings: Sequence[str], tokenizer, vocab_size: int) -> "StopStrings":
        return cls.build(strings, token_strings(tokenizer, vocab_size))

    def initial_state(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        """[B, M] automaton state after the prompt (a stop string may start in the prompt, as in HF)."""
        ids = np.asarray(input_ids)
        state = np.zeros((ids.shape[0], len(self.strings)), np.int32)
        tail = ids[:, -max(len(s) for s in self.strings) * 4:]  # enough tokens to hold any partial match
        for m in range(len(self.strings)):
            for col in range(tail.shape[1]):
                state[:, m] = self.next_state[m, state[:, m], np.clip(tail[:, col], 0, self.next_state.shape[2] - 1)]
        return state


def _kmp_failure(s: str) -> list[int]:
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _kmp_run(s: str, fail: list[int], q: int, text: str) -> tuple[int, bool]:
    hit = False
    for ch in text:
        while q and ch != s[q]:
            q = fail[q - 1]
        if ch == s[q]:
            q += 1
        if q == len(s):
            hit, q = True, fail[q - 1]
    return q, hit


def _stop_step(tables, state: Array, token: Array) -> tuple[Array, Array]:
    """state [B, M], token [B] -> (new state [B, M], hit [B])."""
    nxt, hit = tables
    m = jnp.arange(nxt.shape[0])[None, :]
    return nxt[m, state, token[:, None]], jnp.any(hit[m, state, token[:, None]], axis=-1)


# --- decode state and the two compiled calls -------------------------------------------------------------------
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
    stop, stop_hit = _stop_step(tables, state.stop, token)
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
        cache = KVCache.init(cfg.text, b, cache_len, module.dtype)
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
    from . import sharding as sh
    from jax.sharding import NamedSharding, PartitionSpec as P
    cfg = module.config
    rep = NamedSharding(mesh, P())
    ps = sh.param_sharding_tree(cfg, mesh, rules)
    row = sh.logical_to_sharding(("batch",), mesh, rules)
    row2 = sh.logical_to_sharding(("batch", None), mesh, rules)
    state_s = DecodeState(step=rep, tokens=sh.io_sharding("tokens", mesh, rules), last=row, positions=row,
                          done=row, seen=row2 if st.sampling.uses_seen else None, stop=row2, key=rep,
                          cache=sh.cache_shardings(cfg, mesh, rules))
    ids_s, mask_s = sh.io_sharding("input_ids", mesh, rules), sh.io_sharding("attention_mask", mesh, rules)
    # pixel_values: split like the batch when the image count divides, else replicated
    pix_s = {None: None, "split": sh.io_sharding("pixel_values", mesh, rules),
             "replicated": rep}[pixels]
    j_prefill = sh.jit_sharded(prefill, mesh, in_shardings=(ps, ids_s, pix_s, mask_s, rep, row2, rep),
                               out_shardings=state_s, rules=rules)
    j_decode = sh.jit_sharded(decode, mesh, in_shardings=(ps, state_s, rep, rep), out_shardings=state_s,
                              rules=rules, donate_argnums=(1,))
    return j_prefill, j_decode


# --- inputs ----------------------------------------------------------------------------------------------------
def bucket_length(t: int, minimum: int = MIN_BUCKET) -> int:
    """Round a prompt length up to one of 4 buckets per octave (at most 25% padding): 16, 20, 24, 28, 32, 40..."""
    if t <= minimum:
        return minimum
    step = max(1, 2 ** (int(math.floor(math.log2(t))) - 2))
    return -(-t // step) * step


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [B, T], got shape {a.shape}")
    if a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int32)


def _token_id(v, name: str, vocab_size: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < vocab_size:
        raise ValueError(f"{name}={v!r} is not a token id in the vocabulary [0, {vocab_size})")
    return int(v)


def _eos_ids(cfg, eos_token_id) -> tuple[int, ...]:
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return ()
    return tuple(_token_id(e, "eos_token_id", cfg.text.vocab_size)
                 for e in (eos if isinstance(eos, (list, tuple)) else (eos,)))


def _pad_id(cfg, pad_token_id, eos: tuple[int, ...]) -> int:
    if pad_token_id is not None:
        return _token_id(pad_token_id, "pad_token_id", cfg.text.vocab_size)
    if cfg.text.pad_token_id is not None and 0 <= cfg.text.pad_token_id < cfg.text.vocab_size:
        return int(cfg.text.pad_token_id)
    return eos[0] if eos else 0


def check_count(v, name: str) -> int:
    """A positive whole number: 2.7, "3", True and numpy floats are refused, not truncated."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def check_seed(seed) -> int:
    """The sampling seed: an integer in [0, 2**31) (it is an int32 on the device; larger values would wrap)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return int(seed)


def max_new_tokens_limit(cfg, prompt_tokens: int) -> int:
    """How many tokens fit after a prompt of ``prompt_tokens`` real tokens: the context minus the prompt."""
    return cfg.text.max_position_embeddings - prompt_tokens


@dataclasses.dataclass
class _Prepared:
    ids: np.ndarray
    mask: np.ndarray
    b: int  # rows the caller gave (the rest are mesh padding)


def _prepare(module, input_ids, pixel_values, attention_mask, max_new_tokens: int, mesh, rules,
             bucket: bool) -> _Prepared:
    cfg = module.config
    check_token_ids(input_ids, cfg.text.vocab_size)  # before the int32 cast, which would wrap int64 ids
    ids = _as_int_array(input_ids, "input_ids")
    b, t = ids.shape
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.size and not np.isin(m, (0, 1)).all():
            bad = np.unique(m[~np.isin(m, (0, 1))])[:5].tolist()
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got {bad}")
    mask = np.ones_like(ids) if attention_mask is None else _as_int_array(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    if pixel_values is not None:
        pv = np.asarray(pixel_values)
        if pv.dtype.kind == "f" and not np.isfinite(pv).all():
            bad = sorted({int(i) for i in np.nonzero(~np.isfinite(pv.reshape(pv.shape[0], -1)))[0]})
            raise ValueError(f"pixel_values of image(s) {bad[:10]} hold NaN or infinite values")
    if np.any(mask[:, -1] == 0):
        rows = np.nonzero(mask[:, -1] == 0)[0].tolist()
        raise ValueError(f"rows {rows} end in padding: generation needs left padding (padding_side='left'), so "
                         f"every row's last token is real")
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    if n_images or np.any(ids == cfg.image_token_index):
        err = image_token_mismatch(ids, n_images, cfg.image_token_index, cfg.image_seq_length)
        if err:
            raise ValueError(err)
    ctx = cfg.text.max_position_embeddings
    longest = int(mask.sum(-1).max())
    if longest > ctx:
        raise ValueError(f"The prompt is {longest} tokens long, longer than the model's context of {ctx} tokens "
                         f"(max_position_embeddings); shorten the prompt or use fewer images")
    if max_new_tokens > max_new_tokens_limit(cfg, longest):
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the prompt is {longest} tokens and the "
                         f"model's context {ctx} (max_position_embeddings), so at most "
                         f"{max_new_tokens_limit(cfg, longest)} new tokens")
    pad = _pad_id(cfg, None, _eos_ids(cfg, None))
    if pad == cfg.image_token_index:
        pad = 0
    tb = bucket_length(t) if bucket else t
    if tb > t:  # more left padding: positions come from the mask, so the numbers do not change
        ids = np.concatenate([np.full((b, tb - t), pad, np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((b, tb - t), np.int32), mask], axis=1)
    if mesh is not None:
        from .sharding import pad_batch_inputs
        ids, mask, _ = pad_batch_inputs(ids, mask, mesh, cfg, rules)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        mask[b:, -1] = 1  # padded rows need one real token to stay finite; they are dropped afterwards
    return _Prepared(ids, mask, b)


def _unscanned(module, params):
    """Generation uses unrolled layers: the decode loop must not re-slice stacked weights every step."""
    cfg = module.config
    if not (cfg.text.scan_layers or cfg.vision.scan_layers):
        return module, params
    from .checkpoint import relayout
    warnings.warn("generating with scanned (stacked) layers: each call unstacks a copy of the weights; load with "
                  "scan_layers=False (the default) for inference", stacklevel=4)
    module = VipLlavaForConditionalGeneration(cfg.with_layout(scan_layers=False, remat_policy="none"), module.dtype)
    return module, relayout(params, scan_layers=False)


class _Run:
    """One generation: prefill once, then `advance(limit)` runs the on-device loop up to `limit` tokens."""

    def __init__(self, module, params, input_ids, pixel_values, attention_mask, *, max_new_tokens, sampling,
                 seed, eos_token_id, pad_token_id, stop_strings, mesh, rules, bucket):
        module, params = _unscanned(module, params)
        cfg = module.config
        eos = _eos_ids(cfg, eos_token_id)
        rules = None if mesh is None else tuple(rules or _default_rules())
        seed = check_seed(seed)
        prep = _prepare(module, input_ids, pixel_values, attention_mask, max_new_tokens, mesh, rules, bucket)
        # Capacity is bucketed like prompt lengths, so a new max_new_tokens rarely recompiles; the requested
        # count is the loop's traced limit.
        self.n = int(max_new_tokens)
        cap = bucket_length(self.n) if bucket else self.n
        self.st = _Static(sampling, cap, eos, _pad_id(cfg, pad_token_id, eos))
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
                from .sharding import batch_divisor
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
        from . import sharding as sh
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh, rules, cfg = self.mesh, self.rules, module.config
        params = sh.shard_params(args[0], cfg, mesh, rules)
        ids = sh.put_global(args[1], sh.io_sharding("input_ids", mesh, rules))
        pix = None
        if has_pixels:
            pix = sh.put_global(args[2], sh._pixel_sharding(np.shape(args[2])[0], mesh, rules))
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
        from .sharding import to_host
        return to_host(x)

    def advance(self, limit: int) -> None:
        limit = np.asarray(min(int(limit), self.n), np.int32)
        if self.mesh is not None:
            from .sharding import put_global
            from jax.sharding import NamedSharding, PartitionSpec as P
            limit = put_global(limit, NamedSharding(self.mesh, P()))
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


def _default_rules():
    from .sharding_rules import LOGICAL_AXIS_RULES
    return LOGICAL_AXIS_RULES


# --- public API --------------------------------------------------------------------------------------------------
def generate(module, params, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, *, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             stop_strings: StopStrings | None = None, mesh=None, rules=None, bucket: bool = True) -> np.ndarray:
    """New token ids [B, max_new_tokens] (int32, numpy), the pad id after a row's EOS or stop string.

    input_ids / attention_mask [B, T] in the HF processor's format, left padded (each ``<image>`` expanded to
    image_seq_length image tokens); pixel_values [I, 3, H, W], the images in the order they appear.
    Greedy by default; ``do_sample`` with ``temperature``, ``top_k``, ``top_p`` (HF's semantics) and a
    ``seed``. ``eos_token_id`` / ``pad_token_id`` default to the checkpoint's. ``stop_strings`` from
    ``StopStrings.from_tokenizer(["###"], tokenizer, vocab_size)``. With ``mesh`` (see `make_mesh`), params,
    inputs and the KV cache are sharded by the rules table; a batch that does not divide over data x fsdp is
    padded with masked rows that are dropped from the result."""
    sampling = SamplingConfig(bool(do_sample), float(temperature), top_k, top_p, float(repetition_penalty))
    run = _Run(module, params, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
               sampling=sampling, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
               stop_strings=stop_strings, mesh=mesh, rules=rules, bucket=bucket)
    run.advance(max_new_tokens)  # no host sync in between: the loop does nothing if prefill already finished
    return run.tokens()


def generate_stream_tokens(module, params, input_ids, pixel_values=None, attention_mask=None, *,
                           max_new_tokens: int = 32, chunk_size: int = 4, **kw) -> Iterator[np.ndarray]:
    """Like `generate`, yielding the new tokens [B, k] as they are produced, ``chunk_size`` decode steps per
    device call (the same compiled loop as `generate`; the state stays on the device between calls)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sampling = SamplingConfig(bool(kw.pop("do_sample", False)), float(kw.pop("temperature", 1.0)),
                              kw.pop("top_k", None), kw.pop("top_p", None),
                              float(kw.pop("repetition_penalty", 1.0)))
    run = _Run(module, params, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
               sampling=sampling, seed=kw.pop("seed", 0), eos_token_id=kw.pop("eos_token_id", None),
               pad_token_id=kw.pop("pad_token_id", None), stop_strings=kw.pop("stop_strings", None),
               mesh=kw.pop("mesh", None), rules=kw.pop("rules", None), bucket=kw.pop("bucket", True))
    if kw:
        raise TypeError(f"unexpected arguments: {sorted(kw)}")
    emitted = 0
    while True:
        step = run.step
        if step > emitted:
            yield run.tokens()[:, emitted:step]
            emitted = step
        if run.finished:
            return
        run.advance(step + chunk_size)


def generate_stream(module, params, input_ids, pixel_values=None, attention_mask=None, *, tokenizer,
                    max_new_tokens: int = 256, stop: Sequence[str] = ("###",), chunk_size: int = 4,
                    **kw) -> Iterator[str]:
    """Stream the answer to one prompt (batch 1) as text deltas. Generation stops at EOS, at any of ``stop``
    (matched on the device) or after ``max_new_tokens``; the stop string itself is not yielded."""
    if np.asarray(input_ids).ndim == 2 and np.shape(input_ids)[0] != 1:
        raise ValueError(f"generate_stream takes one prompt (batch 1), got a batch of {np.shape(input_ids)[0]}; "
                         f"use generate() or generate_stream_tokens() for batches")
    vocab = module.config.text.vocab_size
    stop = tuple(stop)
    tables = stop_strings_for(tokenizer, stop, vocab) if stop else None
    ids: list[int] = []
    shown = ""
    pad = kw.get("pad_token_id")
    for chunk in generate_stream_tokens(module, params, input_ids, pixel_values, attention_mask,
                                        max_new_tokens=max_new_tokens, chunk_size=chunk_size,
                                        stop_strings=tables, **kw):
        ids.extend(int(t) for t in chunk[0] if pad is None or t != pad)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:  # hold back a tail that may be the start of a stop string
            text = text[: len(text) - _partial_stop_len(text, stop)]
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
        if cut >= 0:
            return
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    text = text[:cut] if cut >= 0 else text
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


def _partial_stop_len(text: str, stop: Sequence[str]) -> int:
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


@functools.lru_cache(maxsize=8)
def _stop_tables_cached(tokenizer, stop: tuple[str, ...], vocab_size: int) -> StopStrings:
    return StopStrings.from_tokenizer(stop, tokenizer, vocab_size)


def stop_strings_for(tokenizer, stop: Sequence[str], vocab_size: int) -> StopStrings:
    """`StopStrings` for a tokenizer (cached per tokenizer object: building scans the whole vocabulary)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a Processor or an HF processor -> its tokenizer
    return _stop_tables_cached(tok, tuple(stop), int(vocab_size))
