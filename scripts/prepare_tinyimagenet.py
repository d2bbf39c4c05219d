#!/usr/bin/env python3
""" Rewrite an unpacked TinyImageNet (tiny-imagenet-200) into the ImageNet-style layout timm's folder reader expects.

    python scripts/prepare_tinyimagenet.py /data/tiny-imagenet-200
    python train_vit.py --config configs/tinyimagenet_nano_masa.yaml --data-dir /data/tiny-imagenet-200

The archive (http://cs231n.stanford.edu/tiny-imagenet-200.zip) ships
    train/<wnid>/images/*.JPEG          -> moved to train/<wnid>/*.JPEG (timm labels an image by its leaf folder)
    val/images/*.JPEG + val_annotations.txt (file, wnid, box)  -> moved to val/<wnid>/*.JPEG
The test/ split has no labels and is left alone. Files are moved, not copied; running the script again is a no-op.
"""
import argparse
import os
import sys


def _move_up(images_dir: str, class_dir: str) -> int:
    moved = 0
    for name in sorted(os.listdir(images_dir)):
        os.replace(os.path.join(images_dir, name), os.path.join(class_dir, name))
        moved += 1
    os.rmdir(images_dir)
    return moved


def prepare(root: str) -> dict:
    """Rewrite `root` in place; returns how many train and val images were moved."""
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        raise SystemExit(f'error: {root} is not an unpacked tiny-imagenet-200 folder (no train/ and val/ inside).')
    moved = {'train': 0, 'val': 0}
    for wnid in sorted(os.listdir(train_dir)):
        images_dir = os.path.join(train_dir, wnid, 'images')
        if os.path.isdir(images_dir):
            moved['train'] += _move_up(images_dir, os.path.join(train_dir, wnid))

    val_images = os.path.join(val_dir, 'images')
    annotations = os.path.join(val_dir, 'val_annotations.txt')
    if os.path.isdir(val_images):
        if not os.path.isfile(annotations):
            raise SystemExit(f'error: {annotations} not found: cannot tell the class of the val images.')
        with open(annotations) as f:
            labels = dict(line.split('\t')[:2] for line in f if line.strip())
        for name in sorted(os.listdir(val_images)):
            if name not in labels:
                raise SystemExit(f'error: {name} in {val_images} has no line in {annotations}.')
            class_dir = os.path.join(val_dir, labels[name])
            os.makedirs(class_dir, exist_ok=True)
            os.replace(os.path.join(val_images, name), os.path.join(class_dir, name))
            moved['val'] += 1
        os.rmdir(val_images)
    return moved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help='the unpacked tiny-imagenet-200 folder')
    args = parser.parse_args(argv)
    moved = prepare(args.root)
    classes = len([d for d in os.listdir(os.path.join(args.root, 'val'))
                   if os.path.isdir(os.path.join(args.root, 'val', d))])
    print(f'{args.root}: moved {moved["train"]} train and {moved["val"]} val images; val/ has {classes} class folders.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
