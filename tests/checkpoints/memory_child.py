"""Child process of the peak-memory tests (tests/checkpoints/test_convert_memory.py, test_quantize.py):

    python memory_child.py write DIR PRESET     a synthetic fp32 safetensors checkpoint of PRESET ("convert": ~1.1 GB,
                                                "quantize": 441 MB), config.json beside it
    python memory_child.py load DIR [MODE]      load it (float, or quantized int8 / int4) and print, as JSON, the RSS
                                                before and at the peak (VmHWM reset first) and the loaded bytes
"""
import json
import math
import os
import struct
import sys

import numpy as np

from vipllava_jax.checkpoints.hf_table import INVERSE, export_key, hf_key_for
from vipllava_jax.models import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration
from vipllava_jax.models.params import abstract_params, flat_paths

PRESETS = {
    "convert": VipLlavaConfig(
        vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                image_size=28, patch_size=14),
        text=LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16),
        vision_feature_layers=(-2, 1), image_seq_length=4),
    "quantize": VipLlavaConfig(
        vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=14),
        text=LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=16),
        vision_feature_layers=(-2, 1), image_seq_length=4, image_token_index=4000),
}


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def write(d, cfg):
    specs = []
    for path, v in flat_paths(abstract_params(VipLlavaForConditionalGeneration(cfg))).items():
        key, tf = hf_key_for(path, None, cfg)
        specs.append((export_key(key), INVERSE[tf](np.empty(v.value.shape, np.int8)).shape))
    header, off = {}, 0
    for k, s in specs:
        n = math.prod(s) * 4
        header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(0)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for k, s in specs:
            f.write(rng.standard_normal(s, dtype=np.float32).tobytes())
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)


def load(d, mode=None):
    import jax
    from vipllava_jax import load_pretrained
    from vipllava_jax.checkpoints import load_hf_params
    from vipllava_jax.checkpoints.load import load_config
    from vipllava_jax.models.quantize import leaf_bytes
    jax.numpy.zeros(1).block_until_ready()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss_kb("VmRSS")
    if mode is None:
        params = load_hf_params(d, load_config(d), progress=False)
    else:
        _, params = load_pretrained(d, None, quantize=mode, progress=False)
    jax.block_until_ready(params)
    peak = rss_kb("VmHWM")
    n = sum(leaf_bytes(x.shape, x.dtype) for x in jax.tree.leaves(params))
    print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": n, "end_kb": rss_kb("VmRSS")}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], PRESETS[sys.argv[3]])
    else:
        load(sys.argv[2], *sys.argv[3:])
