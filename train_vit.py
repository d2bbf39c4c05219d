#!/usr/bin/env python3
""" Train (or evaluate, with --eval-only) a MASA ViT: `python train_vit.py --config configs/demo_digits.yaml`.

Same as the `masa-train` command; see masa_vit/train.py and docs/training.md.
"""
from masa_vit.train import main

if __name__ == '__main__':
    main()
