"""Helpers shared by the parity tests, the demo and the benchmarks: the relative error they all report, a tiny
batch with images and left padding, and the PyTorch reference logits (torch is imported only when called)."""
from __future__ import annotations

import numpy as np

from .tiny_model import TINY_IMAGE_TOKEN, TINY_PAD_TOKEN

RTOL = 1e-5  # relative to the largest magnitude of the reference


def rel_err(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| in float64, over the positions where ``mask`` is True (all without one)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask], ref[mask]
    return np.abs(ours - ref).max() / np.abs(ref).max()


def make_inputs(rng, n_img=25, n_pad=7):
    """Batch of 2 for the tiny model: row 0 holds two images, row 1 one image and n_pad left-pad tokens."""
    t = 2 * n_img + 12
    ids = rng.integers(3, 99, (2, t))
    ids[0, 2:2 + n_img] = TINY_IMAGE_TOKEN
    ids[0, 6 + n_img:6 + 2 * n_img] = TINY_IMAGE_TOKEN
    ids[1, 20:20 + n_img] = TINY_IMAGE_TOKEN
    mask = np.ones_like(ids)
    mask[1, :n_pad] = 0
    ids[1, :n_pad] = TINY_PAD_TOKEN
    pixels = rng.standard_normal((3, 3, 30, 30)).astype(np.float32)
    return ids, pixels, mask


def torch_logits(tm, ids, pixels, mask):
    """fp32 numpy logits of the PyTorch model, the pixels cast to the model's dtype."""
    import torch
    with torch.no_grad():
        pv = torch.tensor(pixels).to(next(tm.parameters()).dtype)
        return tm(input_ids=torch.tensor(ids), pixel_values=pv,
                  attention_mask=torch.tensor(mask)).logits.float().numpy()
