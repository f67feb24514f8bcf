"""HF VipLlava checkpoints <-> the Flax parameter tree, through one declarative table.

Every HF key is first normalised to one canonical form (whatever the transformers
version that wrote it), then matched against `TABLE`: (HF key pattern, Flax path,
transform). Transforms are small named functions and are exact (transposes only):
the math in the weights never changes. The target tree comes from `jax.eval_shape`,
and every missing, unexpected or mis-shaped key is an error naming the key and both
shapes, raised before any tensor data is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import flax
import flax.linen as nn
from tqdm.auto import tqdm

from .hf_io import CheckpointError, HFCheckpoint, atomic_output_dir, save_safetensors
from .vipllava import VipLlavaConfig, VipLlavaForConditionalGeneration

# --- key layouts -----------------------------------------------------------------------------------------
# (prefix as written, canonical prefix). Applied in order, first match wins.
#   transformers 4.x hub files:   vision_tower.vision_model.*, language_model.model.*, language_model.lm_head.*
#   transformers 5 save_pretrained: vision_tower.* (no vision_model.), language_model.model.*, language_model.lm_head.*
#   transformers 5 module names:  model.vision_tower.*, model.language_model.*, model.multi_modal_projector.*, lm_head.*
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.language_model.model.", "language_model."),
    ("model.language_model.", "language_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# The layout we write back (the hub checkpoints' layout, which transformers 4.x and 5 both read).
EXPORT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "vision_tower.vision_model."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def canonical_key(key: str) -> str:
    for src, dst in KEY_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def export_key(canon: str) -> str:
    for src, dst in EXPORT_PREFIXES:
        if canon.startswith(src):
            return dst + canon[len(src):]
    return canon


# --- transforms (HF tensor -> Flax array, and back) ---------------------------------------------------------
def identity(x):
    return x


def linear_to_kernel(w):  # torch Linear [out, in] -> Dense kernel [in, out]
    return w.T


def conv_to_hwio(w):  # torch Conv2d [D, C, p, p] -> [p, p, C, D]
    return w.transpose(2, 3, 1, 0)


def hwio_to_conv(w):
    return w.transpose(3, 2, 0, 1)


INVERSE: dict[Callable, Callable] = {identity: identity, linear_to_kernel: linear_to_kernel, conv_to_hwio: hwio_to_conv}

# --- the table --------------------------------------------------------------------------------------------
# (canonical HF key regex, Flax path with "{L}" for a layer index, transform). `(?P<L>\d+)` captures the layer.
_V = r"vision_tower\.encoder\.layers\.(?P<L>\d+)\."
_T = r"language_model\.layers\.(?P<L>\d+)\."
TABLE: tuple[tuple[str, str, Callable], ...] = (
    (r"vision_tower\.embeddings\.class_embedding", "vision_tower/embeddings/class_embedding", identity),
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision_tower/embeddings/patch_embedding", conv_to_hwio),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower/embeddings/position_embedding", identity),
    (r"vision_tower\.(?P<m>pre_layrnorm|post_layernorm)\.weight", "vision_tower/{m}/scale", identity),
    (r"vision_tower\.(?P<m>pre_layrnorm|post_layernorm)\.bias", "vision_tower/{m}/bias", identity),
    (_V + r"self_attn\.(?P<m>[qkv]_proj|out_proj)\.weight", "vision_tower/encoder/{L}/self_attn/{m}/kernel", linear_to_kernel),
    (_V + r"self_attn\.(?P<m>[qkv]_proj|out_proj)\.bias", "vision_tower/encoder/{L}/self_attn/{m}/bias", identity),
    (_V + r"mlp\.(?P<m>fc[12])\.weight", "vision_tower/encoder/{L}/mlp/{m}/kernel", linear_to_kernel),
    (_V + r"mlp\.(?P<m>fc[12])\.bias", "vision_tower/encoder/{L}/mlp/{m}/bias", identity),
    (_V + r"(?P<m>layer_norm[12])\.weight", "vision_tower/encoder/{L}/{m}/scale", identity),
    (_V + r"(?P<m>layer_norm[12])\.bias", "vision_tower/encoder/{L}/{m}/bias", identity),
    (r"multi_modal_projector\.projector_layernorm\.weight", "multi_modal_projector/projector_layernorm/scale", identity),
    (r"multi_modal_projector\.projector_layernorm\.bias", "multi_modal_projector/projector_layernorm/bias", identity),
    (r"multi_modal_projector\.(?P<m>linear_[12])\.weight", "multi_modal_projector/{m}/kernel", linear_to_kernel),
    (r"multi_modal_projector\.(?P<m>linear_[12])\.bias", "multi_modal_projector/{m}/bias", identity),
    (r"language_model\.embed_tokens\.weight", "language_model/embed_tokens/embedding", identity),
    (_T + r"self_attn\.(?P<m>[qkvo]_proj)\.weight", "language_model/{L}/self_attn/{m}/kernel", linear_to_kernel),
    (_T + r"self_attn\.(?P<m>[qkvo]_proj)\.bias", "language_model/{L}/self_attn/{m}/bias", identity),
    (_T + r"mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "language_model/{L}/mlp/{m}/kernel", linear_to_kernel),
    (_T + r"mlp\.(?P<m>gate_proj|up_proj|down_proj)\.bias", "language_model/{L}/mlp/{m}/bias", identity),
    (_T + r"(?P<m>input_layernorm|post_attention_layernorm)\.weight", "language_model/{L}/{m}/scale", identity),
    (r"language_model\.norm\.weight", "language_model/norm/scale", identity),
    (r"lm_head\.weight", "lm_head/kernel", linear_to_kernel),
)
_COMPILED = tuple((re.compile(p + r"\Z"), f, t) for p, f, t in TABLE)


@dataclasses.dataclass(frozen=True)
class Target:
    path: str  # Flax path, "/"-joined
    layer: int | None  # index into the stacked leading axis when layers are scanned
    transform: Callable


def flax_target(canon: str, scan_layers: bool) -> Target | None:
    for rx, fmt, tf in _COMPILED:
        m = rx.match(canon)
        if not m:
            continue
        g = m.groupdict()
        layer = int(g["L"]) if g.get("L") is not None else None
        lname = "layers" if scan_layers else f"layers_{layer}"
        return Target(fmt.format(L=lname, m=g.get("m")), layer if scan_layers else None, tf)
    return None


def _scanned(canon: str, config: VipLlavaConfig) -> bool:
    return config.vision.scan_layers if canon.startswith("vision_tower") else config.text.scan_layers


# --- the target tree ----------------------------------------------------------------------------------------
def abstract_params(module: VipLlavaForConditionalGeneration) -> dict:
    """Boxed (logically partitioned) ShapeDtypeStructs of the whole parameter tree, from jax.eval_shape."""
    c = module.config
    n_img = 1
    t = c.image_seq_length + 1
    ids = jnp.zeros((1, t), jnp.int32).at[0, 1:].set(c.image_token_index)
    pv = jnp.zeros((n_img, c.vision.num_channels, c.vision.image_size, c.vision.image_size), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pv))["params"]


def flat_paths(tree) -> dict[str, object]:
    flat = flax.traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    return {"/".join(k): v for k, v in flat.items()}


def _shape_str(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def plan_conversion(ckpt_keys: Iterable[str], shape_of: Callable[[str], tuple], config: VipLlavaConfig,
                    targets: dict[str, tuple]) -> dict[str, Target]:
    """Map every checkpoint key to a target and check names and shapes before any data is read.

    targets: Flax path -> full target shape. Raises CheckpointError listing every problem."""
    problems: list[str] = []
    plan: dict[str, Target] = {}
    seen: dict[tuple[str, int | None], str] = {}
    for key in ckpt_keys:
        canon = canonical_key(key)
        if config.tie_word_embeddings and canon == "lm_head.weight":
            continue  # tied: the lm_head is the embedding matrix
        tgt = flax_target(canon, _scanned(canon, config))
        if tgt is None:
            problems.append(f"unexpected key {key!r} (shape {_shape_str(shape_of(key))}): no rule in the table "
                            f"matches it")
            continue
        if tgt.path not in targets:
            problems.append(f"unexpected key {key!r} (shape {_shape_str(shape_of(key))}): the config has no "
                            f"parameter {tgt.path} (check num_hidden_layers and tie_word_embeddings)")
            continue
        full = targets[tgt.path]
        if tgt.layer is not None and tgt.layer >= full[0]:
            problems.append(f"unexpected key {key!r}: layer {tgt.layer} but the config has {full[0]} layers")
            continue
        expected = full[1:] if tgt.layer is not None else full
        got = tgt.transform(np.empty(shape_of(key), np.int8)).shape
        if tuple(got) != tuple(expected):
            hf_expected = INVERSE[tgt.transform](np.empty(expected, np.int8)).shape
            problems.append(f"wrong shape for key {key!r}: checkpoint has {_shape_str(shape_of(key))}, the config "
                            f"expects {_shape_str(hf_expected)} (Flax {tgt.path} {_shape_str(expected)})")
            continue
        slot = (tgt.path, tgt.layer)
        if slot in seen:
            problems.append(f"keys {seen[slot]!r} and {key!r} both map to {tgt.path}"
                            + (f" layer {tgt.layer}" if tgt.layer is not None else ""))
            continue
        seen[slot] = key
        plan[key] = tgt
    filled: dict[str, set] = {}
    for (path, layer) in seen:
        filled.setdefault(path, set()).add(layer)
    for path, shape in targets.items():
        got = filled.get(path, set())
        if not got:
            problems.append(f"missing key for {path} (expected HF {hf_key_for(path, None, config)[0]!r} with shape "
                            f"{_shape_str(_hf_shape(path, shape, config))})")
        elif None not in got:
            lost = sorted(set(range(shape[0])) - got)
            if lost:
                problems.append(f"missing key(s) for layers {lost} of {path} (e.g. "
                                f"{hf_key_for(path, lost[0], config)[0]!r})")
    if problems:
        head = f"Checkpoint does not match the VipLlava config: {len(problems)} problem(s):\n  "
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise CheckpointError(head + "\n  ".join(problems[:30]) + more)
    return plan


def _flax_layer_regex(fmt: str) -> re.Pattern:
    rx = re.escape(fmt).replace(r"\{L\}", r"(?P<L>layers(?:_\d+)?)").replace(r"\{m\}", r"(?P<m>[A-Za-z0-9_]+)")
    return re.compile(rx + r"\Z")


_FLAX_TO_HF = tuple((_flax_layer_regex(f), p, t) for p, f, t in TABLE)


def _hf_from_pattern(pattern: str, m: str | None, layer: int | None) -> str:
    s = pattern.replace(r"\.", ".")
    s = re.sub(r"\(\?P<L>\\d\+\)", str(layer), s)
    s = re.sub(r"\(\?P<m>[^)]*\)", m or "", s)
    return s


def hf_key_for(path: str, layer: int | None, config: VipLlavaConfig) -> tuple[str, Callable]:
    """Flax path (+ stacked layer index) -> (canonical HF key, forward transform)."""
    for rx, pattern, tf in _FLAX_TO_HF:
        mm = rx.match(path)
        if not mm:
            continue
        g = mm.groupdict()
        if "L" in g:
            lname = g["L"]
            layer = int(lname.split("_")[1]) if lname.startswith("layers_") else layer
        return _hf_from_pattern(pattern, g.get("m"), layer), tf
    raise KeyError(f"no table rule produces Flax path {path}")


def _hf_shape(path, shape, config):
    key, tf = hf_key_for(path, 0, config)
    if "layers/" in path and not re.search(r"layers_\d+", path):
        shape = shape[1:]
    return INVERSE[tf](np.empty(shape, np.int8)).shape


# --- loading ------------------------------------------------------------------------------------------------
def load_hf_params(model_dir: str | os.PathLike, config: VipLlavaConfig, *, dtype=None, shardings: dict | None = None,
                   progress: bool = True) -> dict:
    """Stream an HF checkpoint onto the Flax tree.

    dtype: None keeps each tensor's checkpoint dtype. shardings: Flax path -> jax.sharding.Sharding, to place
    each tensor straight onto its shards (each process reads only the slices its devices hold)."""
    module = VipLlavaForConditionalGeneration(config)
    targets = {p: tuple(v.value.shape if isinstance(v, nn.Partitioned) else v.shape)
               for p, v in flat_paths(abstract_params(module)).items()}
    ckpt = HFCheckpoint(model_dir)
    keys = ckpt.keys()
    plan = plan_conversion(keys, ckpt.shape, config, targets)
    not_float = [k for k in plan if not ckpt.is_float(k)]
    if not_float:
        raise CheckpointError(f"{model_dir}: tensor(s) stored as integers or booleans where floating-point "
                              f"weights are expected: {not_float[:5]}" + (" ..." if len(not_float) > 5 else ""))
    out: dict[str, jax.Array] = {}
    stacks: dict[str, tuple[np.ndarray, set]] = {}
    total = sum(int(np.prod(ckpt.shape(k))) for k in plan)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc="Converting", disable=not progress)

    def place(path, arr):
        sh = None if shardings is None else shardings.get(path)
        target_dtype = dtype or arr.dtype
        if sh is None:
            out[path] = jax.device_put(np.array(arr, dtype=target_dtype))
        else:
            out[path] = jax.make_array_from_callback(
                arr.shape, sh, lambda idx: np.asarray(arr[idx], dtype=target_dtype))

    lazy_stacks: dict[str, dict[int, np.ndarray]] = {}

    def place_stacked(path, layers):
        target_dtype = dtype or layers[0].dtype
        shape = (len(layers),) + tuple(layers[0].shape)

        def read(idx):
            rest = tuple(idx[1:])
            return np.stack([np.asarray(layers[i][rest], dtype=target_dtype) for i in range(len(layers))[idx[0]]])
        out[path] = jax.make_array_from_callback(shape, shardings[path], read)

    for key in keys:
        if key not in plan:
            continue
        tgt = plan[key]
        arr = tgt.transform(ckpt.get(key))
        if tgt.layer is None:
            place(tgt.path, arr)
        elif shardings is not None and shardings.get(tgt.path) is not None:
            # Sharded and scanned: keep each layer's lazy view and stack only the slices this process's
            # devices hold, so no host ever materialises the whole stacked tensor.
            views = lazy_stacks.setdefault(tgt.path, {})
            views[tgt.layer] = arr
            if len(views) == targets[tgt.path][0]:
                place_stacked(tgt.path, [views[i] for i in range(len(views))])
                del lazy_stacks[tgt.path]
        else:
            if tgt.path not in stacks:
                stacks[tgt.path] = (np.empty(targets[tgt.path], dtype or arr.dtype), set())
            buf, done = stacks[tgt.path]
            buf[tgt.layer] = arr
            done.add(tgt.layer)
            if len(done) == buf.shape[0]:
                place(tgt.path, buf)
                del stacks[tgt.path]
        del arr
        bar.update(int(np.prod(ckpt.shape(key))))
    bar.close()
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """config.json as a dict; anything that is not a JSON object is a `CheckpointError` naming the file."""
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise CheckpointError(f"No config.json in {model_dir}")
    try:
        with open(p, "rb") as f:
            d = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: a JSON {type(d).__name__}, not an object of config fields")
    return d


def load_config_file(model_dir: str | os.PathLike, **kw) -> VipLlavaConfig:
    """`VipLlavaConfig.from_hf` of a directory's config.json; a bad field is a `CheckpointError` naming the file."""
    p = Path(model_dir) / "config.json"
    d = read_hf_config(model_dir)
    try:
        return VipLlavaConfig.from_hf(d, **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: {e}") from None


# --- export -------------------------------------------------------------------------------------------------
def to_hf_state_dict(params: dict, config: VipLlavaConfig) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (HF key in the hub layout, numpy array) tensor by tensor."""
    for path, value in flat_paths(params).items():
        value = value.value if isinstance(value, nn.Partitioned) else value
        scanned = "layers/" in path and not re.search(r"layers_\d+", path)
        if scanned:
            for i in range(value.shape[0]):
                key, tf = hf_key_for(path, i, config)
                yield export_key(key), INVERSE[tf](np.asarray(jax.device_get(value[i])))
        else:
            key, tf = hf_key_for(path, None, config)
            yield export_key(key), INVERSE[tf](np.asarray(jax.device_get(value)))


def save_hf(params: dict, config: VipLlavaConfig, out_dir: str | os.PathLike, *, dtype=None,
            max_shard_bytes: int = 5 * 2**30, extra_files_from: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Write an HF directory (config.json + safetensors shards + index) that transformers loads.

    Written into a temporary sibling and swapped into place (`hf_io.atomic_output_dir`), so ``out_dir`` is at
    every moment absent, the old directory whole (replaced only with ``overwrite``), or the new one whole.
    Call it on process 0 with host (numpy) params."""
    with atomic_output_dir(out_dir, overwrite=overwrite, collective=False) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        weight_map = {}
        names = []

        def flush():
            nonlocal size
            if shards[-1]:
                fn = f"model-{len(names) + 1:05d}.safetensors"
                save_safetensors(tmp / fn, shards[-1], {"format": "pt"})
                for k in shards[-1]:
                    weight_map[k] = fn
                names.append(fn)
                shards[-1] = {}
                size = 0

        for key, arr in to_hf_state_dict(params, config):
            if dtype is not None:
                arr = arr.astype(dtype)
            arr = np.ascontiguousarray(arr)
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
            shards[-1][key] = arr
            size += arr.nbytes
        flush()
        total = len(names)
        final = {}
        for i, fn in enumerate(names):
            new = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(tmp / fn, tmp / new)
            final[fn] = new
        if total > 1:
            index = {"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump(index, f, indent=2)
        with open(tmp / "config.json", "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        if extra_files_from is not None:
            copy_tokenizer_files(extra_files_from, tmp)
    return Path(out_dir).absolute()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src, dst):
    import shutil
    for fn in TOKENIZER_FILES:
        if (Path(src) / fn).exists():
            shutil.copy2(Path(src) / fn, Path(dst) / fn)
