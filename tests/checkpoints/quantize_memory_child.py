"""Child of test_quantize.py::test_quantized_load_peak_memory: ``write DIR`` a synthetic fp32 checkpoint (441 MB),
``load DIR MODE`` it quantized and print the RSS before and at the peak (VmHWM reset first), as JSON."""
import json, math, os, struct, sys
import numpy as np
from vipllava_jax.models import VipLlavaConfig, VipLlavaForConditionalGeneration, CLIPVisionConfig, LlamaConfig
from vipllava_jax.checkpoints.hf_table import INVERSE, export_key, hf_key_for
from vipllava_jax.models.params import abstract_params, flat_paths

mode, d = sys.argv[1], sys.argv[2]
cfg = VipLlavaConfig(
    vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14),
    text=LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                     num_attention_heads=16, num_key_value_heads=16),
    vision_feature_layers=(-2, 1), image_seq_length=4, image_token_index=4000)

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

if mode == "write":
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
        f.write(struct.pack("<Q", len(hb))); f.write(hb)
        for k, s in specs:
            f.write(rng.standard_normal(s, dtype=np.float32).tobytes())
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
else:
    import jax
    from vipllava_jax import load_pretrained
    from vipllava_jax.models.quantize import leaf_bytes
    jax.numpy.zeros(1).block_until_ready()
    open("/proc/self/clear_refs", "w").write("5")
    base = rss_kb("VmRSS")
    m, params = load_pretrained(d, None, quantize=sys.argv[3], progress=False)
    jax.block_until_ready(params)
    peak = rss_kb("VmHWM")
    n = sum(leaf_bytes(x.shape, x.dtype) for x in jax.tree.leaves(params))
    print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": n, "end_kb": rss_kb("VmRSS")}))
