"""Peak memory while converting a synthetic ~1 GB checkpoint stays under 1.5x its size."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import json, math, os, struct, sys
    import numpy as np
    from vipllava_jax.models import VipLlavaConfig, VipLlavaForConditionalGeneration
    from vipllava_jax.checkpoints import load_hf_params
    from vipllava_jax.checkpoints.hf_table import INVERSE, export_key, hf_key_for
    from vipllava_jax.models.params import abstract_params, flat_paths
    from vipllava_jax.models import CLIPVisionConfig, LlamaConfig

    mode, d = sys.argv[1], sys.argv[2]
    cfg = VipLlavaConfig(
        vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                image_size=28, patch_size=14),
        text=LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16),
        vision_feature_layers=(-2, 1), image_seq_length=4)

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
        jax.numpy.zeros(1).block_until_ready()
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = rss_kb("VmRSS")
        params = load_hf_params(d, cfg, progress=False)
        jax.block_until_ready(params)
        peak = rss_kb("VmHWM")
        n = sum(x.nbytes for x in jax.tree.leaves(params))
        print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": n}))
''')


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_conversion_peak_memory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", SCRIPT, "write", str(tmp_path)], check=True, env=env)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert 0.9e9 < size < 1.3e9
    r = subprocess.run([sys.executable, "-c", SCRIPT, "load", str(tmp_path)], check=True, env=env,
                       capture_output=True, text=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["param_bytes"] == size - 8 - int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    growth = (m["peak_kb"] - m["base_kb"]) * 1024
    print(f"checkpoint {size / 1e9:.2f} GB, peak growth {growth / 1e9:.2f} GB ({growth / size:.2f}x), "
          f"peak RSS {m['peak_kb'] * 1024 / 1e9:.2f} GB")
    assert growth < 1.5 * size
