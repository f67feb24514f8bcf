"""Peak memory while converting a synthetic ~1 GB checkpoint stays under 1.5x its size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("memory_child.py")  # writes the synthetic checkpoint, loads it in a fresh process


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_conversion_peak_memory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, CHILD, "write", str(tmp_path), "convert"], check=True, env=env)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert 0.9e9 < size < 1.3e9
    r = subprocess.run([sys.executable, CHILD, "load", str(tmp_path)], check=True, env=env,
                       capture_output=True, text=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["param_bytes"] == size - 8 - int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    growth = (m["peak_kb"] - m["base_kb"]) * 1024
    print(f"checkpoint {size / 1e9:.2f} GB, peak growth {growth / 1e9:.2f} GB ({growth / size:.2f}x), "
          f"peak RSS {m['peak_kb'] * 1024 / 1e9:.2f} GB")
    assert growth < 1.5 * size
