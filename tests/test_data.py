""" Data: the bundled digits dataset, folder datasets with bad input, the resumable sampler, the TinyImageNet script """
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from masa_vit.data import (
    BadImageError, DataError, DigitsDataset, ResumableSampler, create_dataset, create_loader, dataset_classes,
    set_loader_epoch, skipped_images,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).min() >= 34 and np.bincount(val.targets).max() <= 37  # stratified: 10 x ~36
    assert dataset_classes(train) == 10
    img, target = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and 0 <= target < 10
    again = DigitsDataset('train')
    assert train.targets == again.targets
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(train.images[:50], again.images[:50]))
    # no image of val is also in train
    train_px = {np.asarray(im).tobytes() for im in train.images}
    overlap = sum(np.asarray(im).tobytes() in train_px for im in val.images)
    assert overlap <= 3  # the raw data holds a few exact duplicate scans; the split itself is disjoint by index


def test_digits_through_timm_loader():
    dataset = create_dataset('digits', split='train', is_training=True)
    loader = create_loader(dataset, is_training=True, input_size=(3, 32, 32), batch_size=16, hflip=0.,
                           num_workers=0, use_prefetcher=False, device=torch.device('cpu'), seed=0)
    set_loader_epoch(loader, 0)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert len(loader) == 1437 // 16


def _write_images(folder, n, size=8):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i}.png'))


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        create_dataset('', str(tmp_path / 'missing'), split='train')
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(DataError, match='holds no images'):
        create_dataset('', str(tmp_path), split='train')
    _write_images(str(tmp_path / 'train' / 'a'), 2)
    with pytest.raises(DataError, match="no 'val' split folder"):
        create_dataset('', str(tmp_path), split='val')
    with pytest.raises(DataError, match='no data folder given'):
        create_dataset('', '', split='train')


def test_unreadable_image_fails_or_is_skipped_and_counted(tmp_path):
    _write_images(str(tmp_path / 'train' / 'a'), 3)
    _write_images(str(tmp_path / 'train' / 'b'), 3)
    bad = tmp_path / 'train' / 'b' / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    dataset = create_dataset('', str(tmp_path), split='train')
    bad_index = [i for i in range(len(dataset)) if dataset.reader.filename(i).endswith('broken.png')][0]
    with pytest.raises(BadImageError, match='broken.png'):
        dataset[bad_index]
    dataset = create_dataset('', str(tmp_path), split='train', bad_images='skip')
    assert all(dataset[i][0] is not None for i in range(len(dataset)))
    assert skipped_images(dataset) == 1
    # counted across loader worker processes too
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda b: b)
    for _ in loader:
        pass
    assert skipped_images(dataset) == 2


def test_sampler_two_ranks_make_the_one_rank_global_batch_and_resume_mid_epoch():
    data = list(range(103))
    one = ResumableSampler(data, num_replicas=1, rank=0, seed=7)
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for s in [one] + ranks:
        s.set_epoch(3)
    order, per_rank = list(one), [list(s) for s in ranks]
    batch = 8  # global batch 8 = 2 ranks x 4
    for step in range(len(data) // batch):
        global_batch = set(per_rank[0][4 * step:4 * step + 4]) | set(per_rank[1][4 * step:4 * step + 4])
        assert global_batch == set(order[batch * step:batch * (step + 1)])
    one.set_epoch(3, start_index=5 * batch)
    assert list(one) == order[5 * batch:] and len(one) == len(order) - 5 * batch
    one.set_epoch(4)
    assert list(one) != order  # a new order each epoch


def test_prepare_tinyimagenet_rewrites_val_into_class_folders(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    _write_images(str(root / 'train' / 'n01' / 'images'), 2)
    _write_images(str(root / 'train' / 'n02' / 'images'), 2)
    _write_images(str(root / 'val' / 'images'), 4)
    (root / 'wnids.txt').write_text('n01\nn02\n')
    (root / 'val' / 'val_annotations.txt').write_text(
        ''.join(f'{i}.png\t{"n01" if i % 2 else "n02"}\t0\t0\t8\t8\n' for i in range(4)))
    cmd = [sys.executable, os.path.join(REPO, 'scripts', 'prepare_tinyimagenet.py'), str(root)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted(os.listdir(root / 'val')) == ['n01', 'n02', 'val_annotations.txt']
    assert sorted(os.listdir(root / 'val' / 'n01')) == ['1.png', '3.png']
    subprocess.run(cmd, check=True, capture_output=True)  # running it again changes nothing
    for split in ('train', 'val'):
        dataset = create_dataset('', str(root), split=split)
        assert dataset_classes(dataset) == 2 and len(dataset) == 4
