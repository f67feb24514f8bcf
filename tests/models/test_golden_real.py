"""Golden check on a real checkpoint, where one is available locally.

    VIPLLAVA_CHECKPOINT=/data/vip-llava-7b-hf python -m pytest tests/models/test_golden_real.py -m slow -s

Runs both models in bfloat16 on one prompt with one random image and compares the logits of the real
(non-pad) positions and the greedy next tokens.
"""
import os

import numpy as np
import pytest

CKPT = os.environ.get("VIPLLAVA_CHECKPOINT")


@pytest.mark.slow
@pytest.mark.skipif(not CKPT, reason="set VIPLLAVA_CHECKPOINT to a local llava-hf/vip-llava-*-hf directory")
def test_real_checkpoint_matches_torch():
    import jax.numpy as jnp
    import torch
    from transformers import AutoProcessor, VipLlavaForConditionalGeneration
    from PIL import Image

    from vipllava_jax import load_pretrained

    proc = AutoProcessor.from_pretrained(CKPT)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8))
    prompt = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the human's questions.###Human: <image>\n"
              "What is inside the red box?###Assistant:")
    inputs = proc(text=prompt, images=image, return_tensors="np")
    tm = VipLlavaForConditionalGeneration.from_pretrained(CKPT, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = tm(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.float().numpy()
    del tm
    module, params = load_pretrained(CKPT, dtype=jnp.bfloat16)
    ours = np.asarray(module.apply({"params": params}, inputs["input_ids"], inputs["pixel_values"],
                                   inputs["attention_mask"]).logits, np.float32)
    assert ours.shape == ref.shape and ref.shape[-1] == 32064
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"bf16 max relative logit difference {rel:.3e}, top-1 agreement {agree:.3f}")
    assert rel < 5e-2 and agree > 0.95
