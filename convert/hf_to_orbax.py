#!/usr/bin/env python
"""Convert an HF VipLlava checkpoint directory (or hub id) into an orbax directory.

    python convert/hf_to_orbax.py llava-hf/vip-llava-7b-hf /data/vip-llava-7b-orbax --dtype bfloat16

Same as ``vipllava-jax convert``; ``--to-hf`` goes the other way (orbax -> HF safetensors).
"""
import sys

from vipllava_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
