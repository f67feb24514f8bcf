"""Prompt checks and preparation on the host: ids, mask, images, counts and token ids checked with one clear
error each; prompts left padded to a bucketed length (4 buckets per octave), so a new prompt length rarely
recompiles (positions come from the attention mask, so the extra padding does not change the numbers)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..models.vipllava import check_token_ids, image_token_mismatch
from ..parallel.shardings import pad_batch_inputs

MIN_BUCKET = 16


# --- inputs ----------------------------------------------------------------------------------------------------
def bucket_length(t: int, minimum: int = MIN_BUCKET) -> int:
    """Round a prompt length up to one of 4 buckets per octave (at most 25% padding): 16, 20, 24, 28, 32, 40..."""
    if t <= minimum:
        return minimum
    step = max(1, 2 ** (int(math.floor(math.log2(t))) - 2))
    return -(-t // step) * step


def as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [B, T], got shape {a.shape}")
    if a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int32)


def token_id(v, name: str, vocab_size: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < vocab_size:
        raise ValueError(f"{name}={v!r} is not a token id in the vocabulary [0, {vocab_size})")
    return int(v)


def eos_ids(cfg, eos_token_id) -> tuple[int, ...]:
    eos = cfg.text.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return ()
    return tuple(token_id(e, "eos_token_id", cfg.text.vocab_size)
                 for e in (eos if isinstance(eos, (list, tuple)) else (eos,)))


def pad_id(cfg, pad_token_id, eos: tuple[int, ...]) -> int:
    if pad_token_id is not None:
        return token_id(pad_token_id, "pad_token_id", cfg.text.vocab_size)
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
class Prepared:
    ids: np.ndarray
    mask: np.ndarray
    b: int  # rows the caller gave (the rest are mesh padding)


def prepare(module, input_ids, pixel_values, attention_mask, max_new_tokens: int, mesh, rules,
             bucket: bool) -> Prepared:
    cfg = module.config
    check_token_ids(input_ids, cfg.text.vocab_size)  # before the int32 cast, which would wrap int64 ids
    ids = as_int_array(input_ids, "input_ids")
    b, t = ids.shape
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.size and not np.isin(m, (0, 1)).all():
            bad = np.unique(m[~np.isin(m, (0, 1))])[:5].tolist()
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got {bad}")
    mask = np.ones_like(ids) if attention_mask is None else as_int_array(attention_mask, "attention_mask")
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
    pad = pad_id(cfg, None, eos_ids(cfg, None))
    if pad == cfg.image_token_index:
        pad = 0
    tb = bucket_length(t) if bucket else t
    if tb > t:  # more left padding: positions come from the mask, so the numbers do not change
        ids = np.concatenate([np.full((b, tb - t), pad, np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((b, tb - t), np.int32), mask], axis=1)
    if mesh is not None:
        ids, mask, _ = pad_batch_inputs(ids, mask, mesh, cfg, rules)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        mask[b:, -1] = 1  # padded rows need one real token to stay finite; they are dropped afterwards
    return Prepared(ids, mask, b)
