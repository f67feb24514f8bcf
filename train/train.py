"""Fine-tune VipLlava: the same as `vipllava-jax train ...` (see README, "Fine-tune").

    python train/train.py --config train/configs/stage2_full.yaml --model DIR --data data.json \
        --image-folder images/ --output runs/stage2
"""
import sys

from vipllava_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
