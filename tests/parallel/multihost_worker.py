"""One process of the two-process test (tests/parallel/test_multihost.py): 4 CPU devices each, gloo collectives.

Run by the test as
    python tests/parallel/multihost_worker.py --coordinator localhost:PORT --num-processes 2 --process-id I \
        --ckpt HF_DIR --orbax ORBAX_DIR --inputs inputs.npz --out OUT_DIR
Writes OUT_DIR/proc{I}.npz (logits, greedy tokens) and OUT_DIR/proc{I}.json (what it read, device counts).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from vipllava_jax.parallel import distributed  # noqa: E402

MESHES = ("data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")


class ReadRecorder:
    """Wraps jax.make_array_from_callback while loading: the bytes each callback returned, per distinct slice."""

    def __init__(self):
        self.seen, self.bytes, self.n = set(), 0, 0
        self._orig = jax.make_array_from_callback

    def __enter__(self):
        def wrapped(shape, sharding, cb, *a, **kw):
            self.n += 1
            call = self.n

            def rec(idx):
                out = cb(idx)
                key = (call, tuple((s.start, s.stop, s.step) for s in idx))
                if key not in self.seen:
                    self.seen.add(key)
                    self.bytes += np.asarray(out).nbytes
                return out
            return self._orig(shape, sharding, rec, *a, **kw)
        jax.make_array_from_callback = wrapped
        return self

    def __exit__(self, *exc):
        jax.make_array_from_callback = self._orig


def main():
    ap = argparse.ArgumentParser()
    distributed.add_distributed_args(ap)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--orbax", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    args = ap.parse_args()
    assert distributed.initialize_from_args(args), "expected a multi-process run"

    from vipllava_jax import load_pretrained
    from vipllava_jax import make_mesh, sharded_generate
    from vipllava_jax.parallel import sharded_forward

    pid = jax.process_index()
    info = {"process_index": pid, "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "read_bytes": {}, "meshes": {}}
    inp = np.load(args.inputs)
    ids, pixels, mask = inp["ids"], inp["pixels"], inp["mask"]
    results = {}
    for spec in MESHES:
        mesh = make_mesh(spec)
        with ReadRecorder() as rec:
            module, params = load_pretrained(args.ckpt, mesh=mesh, progress=False)
        info["read_bytes"][spec] = rec.bytes
        info["meshes"][spec] = {k: int(v) for k, v in mesh.shape.items()}
        assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
        assert not all(x.is_fully_addressable for x in jax.tree.leaves(params))
        results[f"{spec}|safetensors|logits"] = sharded_forward(module, params, ids, pixels, mask, mesh=mesh,
                                                                gather=True)
        toks = sharded_generate(module, params, ids, pixels, mask, mesh=mesh, max_new_tokens=args.max_new_tokens)
        results[f"{spec}|safetensors|tokens"] = np.asarray(toks)
        if spec == MESHES[-1]:  # both processes write one orbax checkpoint of the params sharded across them
            from jax.experimental import multihost_utils
            from vipllava_jax.checkpoints import save_orbax
            save_orbax(params, module.config, Path(args.out) / "saved_by_two")
            multihost_utils.sync_global_devices("saved")
        module, params = load_pretrained(args.orbax, mesh=mesh)
        results[f"{spec}|orbax|logits"] = sharded_forward(module, params, ids, pixels, mask, mesh=mesh, gather=True)
    out = Path(args.out)
    np.savez(out / f"proc{pid}.npz", **results)
    (out / f"proc{pid}.json").write_text(json.dumps(info))
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("done")  # neither process leaves while the other still needs it


if __name__ == "__main__":
    main()
