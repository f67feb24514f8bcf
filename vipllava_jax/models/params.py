"""The parameter tree: its abstract shape (`abstract_params`, cached `abstract_param_tree`), "/"-joined paths
(`flat_paths`, `unflatten_paths`) and the scan <-> unrolled relayout (`relayout`, `is_scanned`)."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import flax
import flax.linen as nn

from .config import Runtime, VipLlavaConfig
from .vipllava import VipLlavaForConditionalGeneration


def abstract_params(module: VipLlavaForConditionalGeneration) -> dict:
    """Boxed (logically partitioned) ShapeDtypeStructs of the whole parameter tree, from jax.eval_shape."""
    c = module.config
    n_img = 1
    t = c.image_seq_length + 1
    ids = jnp.zeros((1, t), jnp.int32).at[0, 1:].set(c.image_token_index)
    pv = jnp.zeros((n_img, c.vision.num_channels, c.vision.image_size, c.vision.image_size), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pv))["params"]


@functools.lru_cache(maxsize=16)
def abstract_param_tree(config: VipLlavaConfig, scan_layers: bool = False) -> dict:
    """`abstract_params` of a config in one layout, cached (the tree depends on nothing else). Shared: do not
    modify it."""
    return abstract_params(VipLlavaForConditionalGeneration(config, Runtime(scan_layers=bool(scan_layers))))


def flat_paths(tree) -> dict[str, object]:
    """{"a/b/kernel": leaf}; boxed (nn.Partitioned) leaves are kept whole."""
    flat = flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    return {"/".join(k): v for k, v in flat.items()}


def unflatten_paths(flat: dict[str, object]) -> dict:
    """The inverse of `flat_paths`."""
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def is_scanned(params) -> bool:
    """Whether a parameter tree holds stacked (``nn.scan``) layers."""
    return any("/layers/" in p for p in flat_paths(params))


def _stacked_path(path: str) -> tuple[str, int] | None:
    m = re.search(r"/layers_(\d+)/", path)
    return (path[:m.start()] + "/layers/" + path[m.end():], int(m.group(1))) if m else None


def relayout(params: dict, scan_layers: bool) -> dict:
    """Stack per-layer params (layers_i) into scanned form ("layers", leading axis L), or the reverse."""
    flat = flat_paths(params)
    out = {}
    if scan_layers:
        groups: dict[str, dict[int, jax.Array]] = {}
        for p, v in flat.items():
            sp = _stacked_path(p)
            if sp is None:
                out[p] = v
            else:
                groups.setdefault(sp[0], {})[sp[1]] = v
        for p, layers in groups.items():
            out[p] = jnp.stack([layers[i] for i in range(len(layers))])
    else:
        for p, v in flat.items():
            m = re.search(r"/layers/", p)
            if m is None:
                out[p] = v
            else:
                for i in range(v.shape[0]):
                    out[p[:m.start()] + f"/layers_{i}/" + p[m.end():]] = v[i]
    return unflatten_paths(out)
