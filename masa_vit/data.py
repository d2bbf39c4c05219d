""" Datasets and loaders for masa-vit training

Everything image-related is timm's (`timm.data.create_dataset`, `create_loader`, transforms, Mixup). This module adds
only what timm does not have:

* `DigitsDataset`: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside scikit-learn, so no
  download), split deterministically into 1,437 train / 360 val images and rendered as 32x32 RGB PIL images, so the
  demo and the tests run anywhere through the ordinary timm transform pipeline.
* `create_dataset`: timm's factory plus `digits`, with clear errors for a missing or empty data folder (timm would
  silently fall back to the root folder when `val/` is missing) and an explicit policy for unreadable images.
* `ImageFolderDataset`: timm's `ImageDataset` with that policy: fail naming the file, or skip it and count it
  (timm skips with a warning only, and cannot be told to fail).
* `ResumableSampler` / `create_loader`: timm's loader with an epoch-seeded sampler that can start mid-epoch, so a run
  resumed from a checkpoint (or a 1-process run compared with an N-process one) sees exactly the same samples.
"""
import logging
import os
import signal
from functools import partial
from typing import Any, Optional

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from timm.data import ImageDataset
from timm.data import create_dataset as timm_create_dataset
from timm.data import create_loader as timm_create_loader
from timm.data.loader import PrefetchLoader
from timm.data.distributed_sampler import RepeatAugSampler

__all__ = [
    'DIGITS_MEAN', 'DIGITS_STD', 'DigitsDataset', 'ImageFolderDataset', 'ResumableSampler', 'BadImageError',
    'DataError', 'create_dataset', 'create_loader', 'dataset_classes', 'set_loader_epoch', 'skipped_images',
]

_logger = logging.getLogger(__name__)

# Mean / std of the rendered 32x32 digits training images (grey, so the same for each RGB channel).
DIGITS_MEAN = (0.306, 0.306, 0.306)
DIGITS_STD = (0.324, 0.324, 0.324)

_MAX_WORKER_SLOTS = 256  # skip counters, one per DataLoader worker (+1 for the main process)


class DataError(ValueError):
    """A dataset that cannot be used as given (missing folder, no images, unknown name)."""


class BadImageError(RuntimeError):
    """An image file that cannot be read, with --bad-images error."""


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as a 10-class image dataset (1,437 train / 360 val).

    The 8x8 grey scans (intensity 0..16) are scaled to 0..255, upsampled to `img_size` with bilinear interpolation and
    converted to RGB, so they pass through timm's transforms like any photo. The split is stratified and fixed
    (`seed`), so every run and every process sees the same images.
    """
    num_val = 360

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Any] = None,
            target_transform: Optional[Any] = None,
            img_size: int = 32,
            seed: int = 0,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ('train', 'val', 'validation'):
            raise DataError(f"digits has the splits 'train' and 'val', not {split!r}.")
        digits = load_digits()
        index = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            index, test_size=self.num_val, stratify=digits.target, random_state=seed)
        idx = np.sort(train_idx if split == 'train' else val_idx)
        self.split = 'train' if split == 'train' else 'val'
        self.targets = [int(t) for t in digits.target[idx]]
        pixels = np.clip(np.rint(digits.images[idx] * (255. / 16.)), 0, 255).astype(np.uint8)  # (N, 8, 8)
        self.images = [
            Image.fromarray(p, mode='L').resize((img_size, img_size), Image.BILINEAR).convert('RGB') for p in pixels]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img, target = self.images[index], self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class ImageFolderDataset(ImageDataset):
    """timm's `ImageDataset` with an explicit policy for files that cannot be decoded.

    Args:
        bad_images: 'error' raises `BadImageError` naming the file; 'skip' returns the next readable sample instead
            and counts the skipped file (see `skipped_images`), also across DataLoader worker processes.
    """

    def __init__(self, *args, bad_images: str = 'error', **kwargs):
        super().__init__(*args, **kwargs)
        if bad_images not in ('error', 'skip'):
            raise ValueError(f"bad_images={bad_images!r}: use 'error' or 'skip'.")
        self.bad_images = bad_images
        # one slot per worker so that concurrent increments never race; shared memory survives fork and spawn
        self.skip_counts = torch.zeros(_MAX_WORKER_SLOTS, dtype=torch.int64).share_memory_()

    def _load(self, index: int):
        img, target, *_ = self.reader[index]
        img = Image.open(img)
        return (img.convert(self.input_img_mode) if self.input_img_mode else img), target

    def __getitem__(self, index: int):
        for _ in range(len(self.reader)):
            try:
                img, target = self._load(index)
                break
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for truncated / unknown / corrupt files
                path = self.reader.filename(index, absolute=True)
                if self.bad_images == 'error':
                    raise BadImageError(
                        f"cannot read image {path}: {e}. Fix or remove the file, or pass --bad-images skip to skip "
                        f"and count unreadable images.") from e
                info = torch.utils.data.get_worker_info()
                self.skip_counts[0 if info is None else 1 + info.id % (_MAX_WORKER_SLOTS - 1)] += 1
                _logger.warning(f'Skipped unreadable image {path}: {e}')
                index = (index + 1) % len(self.reader)
        else:
            raise BadImageError(f'no image of the {len(self.reader)} in this dataset can be read.')
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def skipped_images(dataset: Any) -> int:
    """Images skipped as unreadable so far (0 for datasets without the skip policy)."""
    counts = getattr(dataset, 'skip_counts', None)
    return int(counts.sum()) if counts is not None else 0


def dataset_classes(dataset: Any) -> Optional[int]:
    """Number of classes of a dataset from any of the usual places, None if it cannot be told."""
    reader = getattr(dataset, 'reader', None)
    for obj in (dataset, reader):
        if obj is None:
            continue
        if getattr(obj, 'class_to_idx', None):
            return len(obj.class_to_idx)
        if getattr(obj, 'classes', None):
            return len(obj.classes)
    inner = getattr(dataset, 'parser', None) or getattr(reader, 'dataset', None)  # torch/ datasets wrap torchvision
    if inner is not None and getattr(inner, 'classes', None):
        return len(inner.classes)
    return None


def _folder_split(root: str, split: str) -> str:
    """The folder holding `split` under `root`, with an error naming what is there when it is missing."""
    if not root:
        raise DataError('no data folder given: pass --data-dir ROOT (with ROOT/train/<class>/*.jpg and '
                        'ROOT/val/<class>/*.jpg), or --dataset digits for the bundled dataset.')
    if not os.path.isdir(root):
        raise DataError(f'data folder {root} does not exist.')
    synonyms = {
        'train': ('train', 'training'),
        'val': ('val', 'validation', 'valid', 'eval', 'evaluation'),
        'validation': ('validation', 'val', 'valid', 'eval', 'evaluation'),
    }.get(split, (split,))
    for name in synonyms:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise DataError(
        f"data folder {root} has no '{split}' split folder (looked for {', '.join(synonyms)}; found "
        f"{subdirs or 'no sub-folders'}). Expected ROOT/{synonyms[0]}/<class>/<image files>.")


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        is_training: bool = False,
        class_map: str = '',
        download: bool = False,
        batch_size: int = 1,
        seed: int = 42,
        repeats: int = 0,
        bad_images: str = 'error',
        **kwargs: Any,
):
    """timm's `create_dataset` with the bundled `digits` dataset and clear errors for unusable data folders.

    Args:
        name: 'digits', '' or 'folder' (an image folder), or any timm dataset name ('torch/cifar10', 'hfds/...').
        root: Data folder (ignored by 'digits').
        split: Split name ('train', 'val' / 'validation').
        bad_images: 'error' or 'skip' for unreadable image files in folder datasets.
    """
    name = (name or '').lower()
    if name == 'digits':
        return DigitsDataset(split=split)
    if name in ('', 'folder', 'imagefolder', 'image_folder'):
        folder = _folder_split(root, split)
        try:
            dataset = ImageFolderDataset(folder, split=split, class_map=class_map, bad_images=bad_images, **kwargs)
        except RuntimeError as e:  # timm's folder reader: 'Found 0 images in subfolders of ...'
            raise DataError(f'data folder {folder} holds no images (expected {folder}/<class>/<image files>): '
                            f'{e}') from e
        if len(dataset) == 0:
            raise DataError(f'data folder {folder} holds no images (expected {folder}/<class>/<image files>).')
        return dataset
    if name.startswith('torch/') and not download and root and not os.path.isdir(root):
        raise DataError(f'data folder {root} for {name} does not exist: create it, or pass --dataset-download to '
                        f'download the dataset into it (needs network access).')
    try:
        return timm_create_dataset(
            name, root=root, split=split, is_training=is_training, class_map=class_map, download=download,
            batch_size=batch_size, seed=seed, repeats=repeats, **kwargs)
    except RuntimeError as e:
        if name.startswith('torch/') and not download:
            raise DataError(f'{name} not found in {root} ({e}). Pass --dataset-download to download it '
                            f'(needs network access), or point --data-dir at a folder that holds it.') from e
        raise


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """`DistributedSampler` (shuffled with seed + epoch, every rank a disjoint slice) that can start mid-epoch.

    Used for 1 process as well (num_replicas=1), so the order of samples depends only on seed and epoch: the union of
    N ranks' batches at a step is the 1-process batch of the same global size, and a resumed run sees exactly the
    samples the interrupted one would have seen.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def _worker_init_without_signals(worker_init_fn, worker_id: int) -> None:
    # Ctrl-C (and SLURM's scancel) signal every process of the job: loader workers leave SIGINT / SIGTERM to the
    # training process, which finishes its step and saves a checkpoint; workers end when it closes the loader
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def create_loader(
        dataset: torch.utils.data.Dataset,
        *,
        is_training: bool,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 42,
        persistent_workers: bool = False,
        **kwargs: Any,
):
    """timm's `create_loader` (transforms, collate, prefetcher); training loaders get a `ResumableSampler`.

    The loader's own generator seeds the worker processes (seed, rank, epoch: see `set_loader_epoch`), so neither the
    sample order nor the augmentation seeds draw from the global RNG.
    """
    loader = timm_create_loader(
        dataset, is_training=is_training, distributed=world_size > 1, persistent_workers=persistent_workers,
        **kwargs)
    base = loader.loader if isinstance(loader, PrefetchLoader) else loader
    base.worker_init_fn = partial(_worker_init_without_signals, base.worker_init_fn)
    if not is_training or isinstance(base.sampler, RepeatAugSampler) \
            or isinstance(base.dataset, torch.utils.data.IterableDataset):
        return loader
    sampler = ResumableSampler(base.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    new = torch.utils.data.DataLoader(
        base.dataset,
        batch_size=base.batch_size,
        sampler=sampler,
        num_workers=base.num_workers,
        collate_fn=base.collate_fn,
        pin_memory=base.pin_memory,
        drop_last=base.drop_last,
        worker_init_fn=base.worker_init_fn,
        persistent_workers=base.persistent_workers,
        generator=generator,
    )
    new.seed_info = (seed, rank)
    if isinstance(loader, PrefetchLoader):
        loader.loader = new
        return loader
    return new


def set_loader_epoch(loader, epoch: int, start_batch: int = 0) -> None:
    """Point a training loader at `epoch`, optionally starting after `start_batch` batches (resume mid-epoch)."""
    base = loader.loader if isinstance(loader, PrefetchLoader) else loader
    sampler = base.sampler
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, start_index=start_batch * base.batch_size)
    elif hasattr(sampler, 'set_epoch'):
        if start_batch:
            raise ValueError('this sampler cannot start mid-epoch.')
        sampler.set_epoch(epoch)
    seed_info = getattr(base, 'seed_info', None)
    if seed_info is not None and base.generator is not None:
        seed, rank = seed_info
        # worker seeds depend on (seed, rank, epoch) only, not on how many epochs this process has run
        base.generator.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + epoch) % (2 ** 63))
