"""Stop strings (``"###"`` for the llava_v0 chat format), matched on the device with a per-token automaton built
once from the tokenizer's vocabulary: a row stops when the stop string ends inside its newest token, as HF's
``StopStringCriteria`` does. M stop strings, L the longest, V tokens."""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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


def stop_step(tables, state: Array, token: Array) -> tuple[Array, Array]:
    """state [B, M], token [B] -> (new state [B, M], hit [B])."""
    nxt, hit = tables
    m = jnp.arange(nxt.shape[0])[None, :]
    return nxt[m, state, token[:, None]], jnp.any(hit[m, state, token[:, None]], axis=-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any of the ``stop`` strings (all of it when none occurs). A row
    stops at the token that completes a stop string, so its decoded text still holds the stop string and
    whatever else that token adds."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (held back while streaming)."""
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
