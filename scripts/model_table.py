"""Print the table of registered MASA models with their parameter counts (used in README.md).

    python scripts/model_table.py
"""
import argparse

import timm
import torch

import masa_vit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--filter', default='masa_*', help='timm.list_models pattern')
    args = parser.parse_args()
    print('| model | input | patch | dim | depth | heads | S | total params | attention (MASA / dense) | attention compression |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for name in timm.list_models(args.filter):
        model = timm.create_model(name)
        c = masa_vit.count_params(model)
        cfg = model.pretrained_cfg
        print(
            f"| `{name}` | {cfg['input_size'][1]} | {model.patch_embed.patch_size[0]} | {model.embed_dim} "
            f"| {len(model.blocks)} | {model.blocks[0].attn.num_heads} | {model.masa_kwargs['num_atoms']} "
            f"| {c['total'] / 1e6:.2f}M | {c['attention'] / 1e6:.2f}M / {c['attention_dense'] / 1e6:.2f}M "
            f"| {100 * c['attention_compression']:.1f}% |")
        del model


if __name__ == '__main__':
    main()
