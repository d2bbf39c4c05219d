#!/usr/bin/env python3
""" Evaluate a checkpoint: `python validate_vit.py --config X.yaml --resume CKPT --output DIR`.

Same as `masa-validate` and `train_vit.py --eval-only`; writes DIR/eval_results.json (top-1, top-5, loss, parameter
counts, attention compression, images/s).
"""
from masa_vit.train import validate_main

if __name__ == '__main__':
    validate_main()
