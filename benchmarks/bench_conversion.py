#!/usr/bin/env python3
""" Training-free conversion benchmark: Matrix PCA (+ refinement) vs same-budget SVD baselines.

Trains a small dense ViT on scikit-learn's bundled digits (or loads one, or a timm model + checkpoint + image folder),
then converts it at several attention compression ratios with:

    * truncated SVD      per-layer rank-r factorization of each Q/K/V/O projection (data-free)
    * whitened SVD       SVD-LLM: the same with the Cholesky factor of each layer's input autocorrelation
    * Matrix PCA         the paper's closed-form shared atoms (data-free), one group
    * Matrix PCA + refine  plus per-block whitened low-rank residual terms, ranks allocated across Q/K/V/O
    * (+ auto groups)    the same with KL-drift grouping into 2 groups
    * + joint refine     atoms, coefficients and low rank optimized together on the whitened output objective
                         (L-BFGS, or block coordinate descent sweeps), atom count chosen by the objective or by KL on
                         the calibration images
    * , sequential       whitened SVD / Matrix PCA + refine / joint refine, then each block's low-rank terms (and
                         coefficients) refitted in order on the converted model's own activations, towards the dense
                         outputs (or, 'input target', towards the dense weight on the converted inputs)
    * , bias-corrected   whitened SVD / Matrix PCA + refine / joint refine (S by calib KL) fitted on the centered
                         input covariance, with each layer's mean output error moved into its bias (rows svd_llm_bc,
                         mpca_refine_bc, joint_kl_bc; with sequential calibration: svd_llm_seq_bc,
                         mpca_refine_seq_bc)

and reports top-1, agreement with the dense model, mean KL(dense || converted) on held-out images, and attention
parameters. Prints a markdown table and writes JSON.

    python benchmarks/bench_conversion.py                      # digits ViT (trained, then cached in --out)
    python benchmarks/bench_conversion.py --model vit_small_patch16_224 --checkpoint vit_s.pth --data-dir imagenet/
    python benchmarks/bench_conversion.py --bert-energy model.safetensors    # atom energy of a BERT's attention only
    # a headless pretrained backbone (num_classes=0): linear probe on digits upsampled to its input size
    python benchmarks/bench_conversion.py --model vit_small_patch14_dinov2.lvd142m --img-size 224 \
        --checkpoint vit_small_patch14_dinov2_imgfocus.safetensors --threads 1 --budgets 0.2 0.5 \
        --rows svd svd_llm svd_llm_seq mpca mpca_refine mpca_refine_seq

Without --data-dir, --model is evaluated on the bundled digits at the model's input size (the 32 px renders of
masa_vit.data.DigitsDataset upsampled bilinearly, normalized with the model's mean/std). A model without a classifier
(num_classes=0, e.g. DINOv2), or any model with --linear-probe, gets a linear probe first: a logistic regression
(scikit-learn, lbfgs, on standardized features) fitted on the dense model's pooled features (`forward_head(...,
pre_logits=True)`) of the digits train split, installed as the dense model's head, so every converted model (which
copies the non-attention weights) shares it. Besides top-1 / agreement / KL, every row reports label-free feature
fidelity: mean cosine similarity and relative L2 error of the converted model's pooled features against the dense
ones, on the held-out images and on random crops of scikit-learn's two sample photos (`load_sample_images`).

For the digits ViT it also rebuilds the random init (same seed) and reports how far training moved the attention
weights from it, and how much the blocks share in the weights, the init and the update.
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.models import VisionTransformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from masa_vit.conversion import (  # noqa: E402
    _compare_logits, collect_calibration, from_dense, lowrank_rank_for_budget, svd_from_dense,
)
from masa_vit.data import DIGITS_MEAN, DIGITS_STD  # noqa: E402
from masa_vit.masa_vision_transformer import count_params  # noqa: E402
from masa_vit.matrix_pca import matrix_pca_spectrum, whitened_lowrank  # noqa: E402

_logger = logging.getLogger('bench_conversion')

DIGITS_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, num_classes=10)
ROW_KEYS = (
    'svd', 'svd_llm', 'svd_llm_roles', 'svd_llm_seq', 'svd_llm_seq_input', 'mpca', 'mpca_refine', 'mpca_refine_auto',
    'mpca_refine_seq', 'mpca_refine_seq_input', 'joint_objective', 'joint_kl', 'joint_bcd', 'joint_seq', 'joint_rounds',
    'svd_llm_bc', 'mpca_refine_bc', 'joint_kl_bc', 'svd_llm_seq_bc', 'mpca_refine_seq_bc',
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='output/bench_conversion', help='output folder (JSON, cached dense model)')
    p.add_argument('--budgets', type=float, nargs='+', default=[0.2, 0.3, 0.5, 0.7], help='attention compression ratios')
    p.add_argument('--calib-images', type=int, default=256, help='calibration images (from the training split)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    g = p.add_argument_group('digits model')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('--retrain', action='store_true',
                   help='train (or fit the --model linear probe) even if a cached one exists in --out')
    g = p.add_argument_group('your own model')
    g.add_argument('--model', default=None, help='timm ViT name (with --checkpoint and --data-dir)')
    g.add_argument('--checkpoint', default=None, help='dense checkpoint file for --model')
    g.add_argument('--data-dir', default=None, help='image folder with train/ and val/ class folders')
    g.add_argument('--batch-size', type=int, default=64)
    g.add_argument('--eval-images', type=int, default=None, help='cap on held-out images')
    g.add_argument('--img-size', type=int, default=None, help='input size for --model (timm resamples pos_embed)')
    g.add_argument('--linear-probe', action='store_true',
                   help='fit a linear head on the dense features first (automatic when the model has num_classes=0)')
    g.add_argument('--probe-images', type=int, default=None, help='cap on digits train images for the probe')
    g.add_argument('--calib-source', default='digits', choices=('digits', 'natural', 'mixed'),
                   help='calibration images for --model without --data-dir: the digits train split (as the probe), '
                        'random crops of the sample photos, or half and half')
    p.add_argument('--natural-crops', type=int, default=64,
                   help='random crops of the sample photos for the feature-fidelity columns (0: none)')
    p.add_argument('--rows', nargs='+', default=None, choices=ROW_KEYS,
                   help='run only these rows (default: the rows the flags below select)')
    p.add_argument('--refine-iters', type=int, default=300, help='joint refinement iterations (L-BFGS rows)')
    p.add_argument('--bcd-sweeps', type=int, default=100, help='joint refinement sweeps (BCD row; 0: no BCD row)')
    p.add_argument('--no-old-rows', action='store_true', help='only the SVD baselines and the joint refinement rows')
    p.add_argument('--no-sequential', action='store_true', help='no sequential calibration rows')
    p.add_argument('--atom-rounds', type=int, default=0,
                   help='also a row with this many guarded sequential atom rounds (from_dense sequential_atom_rounds)')
    p.add_argument('--bert-energy', default=None, metavar='FILE',
                   help='only print the Matrix PCA atom energy of the attention weights of a BERT safetensors file')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------

def digits_tensors(split: str, normalize: bool = True):
    """The bundled digits split as (N, 3, 32, 32) tensors (normalized with the digits mean/std, else in [0, 1]) and
    labels (masa_vit.data.DigitsDataset)."""
    from torchvision.transforms import functional as TF
    from masa_vit.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
    ds = DigitsDataset(split=split)
    x = torch.stack([TF.to_tensor(img) for img in ds.images])
    if normalize:
        x = TF.normalize(x, DIGITS_MEAN, DIGITS_STD)
    return x, torch.tensor(ds.targets)


def random_shift(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    pad = F.pad(x, [max_shift] * 4, mode='replicate')
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2))
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


def train_digits_vit(epochs: int, seed: int) -> VisionTransformer:
    """AdamW lr 1e-3, wd 0.05, one-cycle, batch 64, label smoothing 0.1, random 2 px shifts (FINDINGS.md recipe)."""
    torch.manual_seed(seed)
    x, y = digits_tensors('train')
    model = VisionTransformer(**DIGITS_VIT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * 64:(i + 1) * 64]
            loss = F.cross_entropy(model(random_shift(x[idx])), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        _logger.info('epoch %d loss %.3f (%.0fs)', epoch, total / steps_per_epoch, time.perf_counter() - t0)
    return model.eval()


def batches(x, y, bs):
    """Consecutive (images, targets) batches of size `bs`, or image batches when `y` is None."""
    if y is None:
        return [x[i:i + bs] for i in range(0, len(x), bs)]
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def load_digits_setup(args):
    from safetensors.torch import load_file, save_file
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f'dense_digits_vit_e{args.epochs}_s{args.seed}.safetensors')
    t0 = time.perf_counter()
    if os.path.exists(path) and not args.retrain:
        dense = VisionTransformer(**DIGITS_VIT)
        dense.load_state_dict(load_file(path))
        dense.eval()
        source = f'cached {path}'
    else:
        dense = train_digits_vit(args.epochs, args.seed)
        save_file(dense.state_dict(), path)
        source = f'trained {args.epochs} epochs (seed {args.seed}), saved to {path}'
    train_s = time.perf_counter() - t0
    xt, yt = digits_tensors('train')
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(xt), generator=g)[:args.calib_images]
    calib = batches(xt[idx], yt[idx], 64)
    xv, yv = digits_tensors('val')
    return dense, calib, batches(xv, yv, 120), dict(model='digits ViT ' + str(DIGITS_VIT), source=source,
                                                      train_seconds=train_s, eval_images=len(xv))


def digits_at_size(split: str, img_size: int, mean, std, limit: Optional[int] = None, seed: int = 0):
    """The digits split upsampled to `img_size` (bilinear, from the 32 px renders) and normalized with `mean`/`std`,
    as (N, 3, img_size, img_size) images and labels; a seeded random subset of `limit` images when given."""
    x, y = digits_tensors('train' if split == 'train' else 'val', normalize=False)
    if limit is not None and limit < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[idx], y[idx]
    x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    return _normalize(x, mean, std), y


def natural_crops(num: int, img_size: int, mean, std, seed: int = 0) -> torch.Tensor:
    """`num` random square crops (side uniform between a quarter of the shorter photo side and all of it) of
    scikit-learn's two sample photos (`load_sample_images`: china.jpg, flower.jpg, 427 x 640), alternating between
    them, resized to `img_size` (bilinear, antialiased) and normalized: (num, 3, img_size, img_size)."""
    from sklearn.datasets import load_sample_images
    photos = [torch.tensor(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        photo = photos[i % len(photos)]
        h, w = photo.shape[-2:]
        side = int(torch.randint(min(h, w) // 4, min(h, w) + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = photo[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(img_size, img_size), mode='bilinear', antialias=True,
                                 align_corners=False))
    return _normalize(torch.cat(out).clamp(0, 1), mean, std)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def pooled_features(model: nn.Module, data) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled features (N, D), logits (N, C)) of `model` in eval mode, one forward pass per batch: the features are
    `forward_head(forward_features(x), pre_logits=True)` (CLS token or average pool, fc_norm), the logits the head
    applied to them. Batches are image tensors or (images, targets) pairs."""
    was_training = model.training
    model.eval()
    feats, logits = [], []
    try:
        for batch in data:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.float())
            logits.append(model.head(f).float())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def fit_linear_probe(model: VisionTransformer, train, num_classes: int, seed: int = 0) -> Dict[str, Any]:
    """Fit a linear classifier on `model`'s pooled features of the labelled `train` batches and install it as the
    model's head (`reset_classifier(num_classes)`, then the weights).

    The classifier is scikit-learn's multinomial LogisticRegression (lbfgs, C=1, up to 2000 iterations) on
    standardized features; the standardization is folded into the head (w / sigma, b - w mu / sigma), so the head
    is one `nn.Linear` on the raw features. Returns the probe's training accuracy, iterations and seconds.
    """
    from sklearn.linear_model import LogisticRegression
    t0 = time.perf_counter()
    feats, _ = pooled_features(model, [x for x, _ in train])
    targets = torch.cat([y for _, y in train])
    feats = feats.double()
    mu, sigma = feats.mean(0), feats.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(((feats - mu) / sigma).numpy(), targets.numpy())
    if list(clf.classes_) != list(range(num_classes)):
        raise ValueError(f'the probe needs every class 0..{num_classes - 1} in its training split, got {clf.classes_}')
    w = torch.from_numpy(clf.coef_) / sigma
    b = torch.from_numpy(clf.intercept_) - w @ mu
    model.reset_classifier(num_classes)
    with torch.no_grad():
        model.head.weight.copy_(w.to(model.head.weight.dtype))
        model.head.bias.copy_(b.to(model.head.bias.dtype))
    acc = float((model.head(feats.to(model.head.weight.dtype)).argmax(-1) == targets).double().mean())
    return dict(train_images=len(targets), train_top1=acc, iterations=int(clf.n_iter_.max()),
                seconds=time.perf_counter() - t0, method='sklearn LogisticRegression(C=1, lbfgs) on standardized '
                'pooled features, folded into the head')


def feature_fidelity(dense_feats: torch.Tensor, feats: torch.Tensor) -> Dict[str, float]:
    """Mean over images of the cosine similarity and of the relative L2 error ||f - f_dense|| / ||f_dense||."""
    d, f = dense_feats.double(), feats.double()
    return dict(feat_cos=float(F.cosine_similarity(d, f, dim=-1).mean()),
                feat_rel_l2=float(((f - d).norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-12)).mean()))


def load_user_setup(args):
    overlay = dict(file=args.checkpoint) if args.checkpoint else None
    kwargs = dict(img_size=args.img_size) if args.img_size else {}
    if not args.checkpoint:
        raise SystemExit('--model needs --checkpoint (a local dense checkpoint; the benchmark runs offline)')
    dense = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    if args.data_dir:
        cfg = timm.data.resolve_data_config({}, model=dense)
        tf = timm.data.create_transform(**cfg)

        def loader(split, limit):
            from masa_vit.data import create_dataset
            ds = create_dataset('', root=args.data_dir, split=split, transform=tf)
            if limit is not None and limit < len(ds):
                g = torch.Generator().manual_seed(args.seed)
                ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
            return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=2)
        return dense, loader('train', args.calib_images), loader('val', args.eval_images), dict(
            model=args.model, source=args.checkpoint, eval_images=None)
    return headless_digits_setup(dense, args, source=args.checkpoint, name=args.model)


def linear_probe_cached(dense: VisionTransformer, args, source: str, img_size: int, mean, std) -> Dict[str, Any]:
    """`fit_linear_probe` on the digits train split at `img_size`, cached as a head file in `args.out` (keyed by the
    checkpoint's file name, image size, probe images and seed; `--retrain` refits)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    stem = os.path.splitext(os.path.basename(source or 'model'))[0]
    path = os.path.join(args.out, f'probe_{stem}_{img_size}px_n{args.probe_images or "all"}_s{args.seed}.safetensors')
    if os.path.exists(path) and not args.retrain:
        head = load_file(path)
        dense.reset_classifier(head['weight'].shape[0])
        dense.head.load_state_dict(head)
        with safe_open(path, 'pt') as f:
            info = dict(json.loads(f.metadata()['probe']), cached=path)
    else:
        xt, yt = digits_at_size('train', img_size, mean, std, limit=args.probe_images, seed=args.seed)
        info = fit_linear_probe(dense, batches(xt, yt, args.batch_size), num_classes=10, seed=args.seed)
        os.makedirs(args.out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in dense.head.state_dict().items()}, path,
                  metadata=dict(probe=json.dumps(info)))
    _logger.info('linear probe: %s', info)
    return info


def headless_digits_setup(dense: VisionTransformer, args, source: str = '', name: str = ''):
    """Labelled digits at the model's input size for a pretrained timm ViT: a linear probe (when the model has no
    classifier or `args.linear_probe`), calibration batches (digits train split or sample-photo crops,
    `args.calib_source`) and held-out digits batches."""
    img_size = dense.patch_embed.img_size[0]
    mean, std = dense.pretrained_cfg.get('mean', IMAGENET_MEAN), dense.pretrained_cfg.get('std', IMAGENET_STD)
    bs = args.batch_size
    setup = dict(model=name or type(dense).__name__, source=source, img_size=img_size, mean=mean, std=std,
                 data=f'digits upsampled 32 -> {img_size} px (bilinear)')
    if dense.num_classes == 0 or args.linear_probe:
        setup['probe'] = linear_probe_cached(dense, args, source, img_size, mean, std)
    # calibration crops use another seed than the evaluation crops (but the same two photos)
    if args.calib_source == 'natural':
        calib = batches(natural_crops(args.calib_images, img_size, mean, std, seed=args.seed + 1), None, bs)
    elif args.calib_source == 'mixed':
        half = args.calib_images // 2
        xc, _ = digits_at_size('train', img_size, mean, std, limit=args.calib_images - half, seed=args.seed)
        calib = batches(torch.cat([xc, natural_crops(half, img_size, mean, std, seed=args.seed + 1)]), None, bs)
    else:
        xc, yc = digits_at_size('train', img_size, mean, std, limit=args.calib_images, seed=args.seed)
        calib = batches(xc, yc, bs)
    setup['calib'] = f'{args.calib_images} {args.calib_source} images'
    xv, yv = digits_at_size('val', img_size, mean, std, limit=args.eval_images, seed=args.seed)
    setup['eval_images'] = len(xv)
    return dense, calib, batches(xv, yv, bs), setup


@torch.no_grad()
def whitened_svd_per_role(dense: VisionTransformer, stats, ranks, attention_dense: int):
    """SVD-LLM with one rank per role (Q/K/V/O) instead of one for all: each projection replaced by its whitened
    rank-r_role factorization, evaluated as a dense model holding the products U V (the model class's
    sharing='low_rank' takes one rank for all roles). Parameters counted as the factors would be stored."""
    model = copy.deepcopy(dense).eval()
    chol = stats.cholesky()
    d, depth = dense.embed_dim, len(dense.blocks)
    for i, blk in enumerate(model.blocks):
        for lname, kinds in (('qkv', 'qkv'), ('proj', 'o')):
            lin = getattr(blk.attn, lname)
            w = lin.weight.detach().double().clone()
            for j, k in enumerate(kinds):
                rows = slice(j * d, (j + 1) * d)
                r = ranks.get(k, 0)
                c = chol[f'blocks.{i}.attn.{lname}']
                w[rows] = torch.mm(*whitened_lowrank(w[rows], None, r, chol=c)) if r else 0
            lin.weight.copy_(w.to(lin.weight.dtype))
    attention = attention_dense - 4 * depth * d * d + sum(ranks.get(k, 0) * depth * 2 * d for k in 'qkvo')
    model.conversion_report = dict(rank=dict(ranks), params=dict(
        attention=attention, attention_dense=attention_dense, attention_compression=1 - attention / attention_dense))
    return model


def _energy_rows(stacks, atom_counts):
    rows = []
    for name, stack in stacks:
        eig = matrix_pca_spectrum(stack)
        frac = (eig.cumsum(0) / eig.sum()).tolist()
        rows.append(f'| {name} | ' + ' | '.join(f'{100 * frac[s - 1]:.1f}' for s in atom_counts) + ' |')
    return rows


def bert_energy(path: str) -> str:
    """Matrix PCA atom energy of the Q/K/V/O weights of a BERT-style safetensors file (all its layers, one group)."""
    from safetensors.torch import load_file
    sd = load_file(path)
    prefix = next(k[:-len('encoder.layer.0.attention.self.query.weight')] for k in sd
                  if k.endswith('encoder.layer.0.attention.self.query.weight'))
    depth = 1 + max(int(k[len(prefix):].split('.')[2]) for k in sd if k.startswith(prefix + 'encoder.layer.'))
    parts = (('q', 'attention.self.query'), ('k', 'attention.self.key'), ('v', 'attention.self.value'),
             ('o', 'attention.output.dense'))
    counts = (1, depth // 3, depth // 2)
    shape = tuple(sd[f'{prefix}encoder.layer.0.attention.self.query.weight'].shape)
    rows = _energy_rows([(k, torch.stack([sd[f'{prefix}encoder.layer.{i}.{n}.weight'] for i in range(depth)]))
                         for k, n in parts], counts)
    return '\n'.join([
        f'{path}: {depth} layers, attention weights {shape}. Energy captured by S Matrix PCA atoms (%, one group; '
        f'blocks that share nothing give 100 S / {depth}):', '',
        '| proj | ' + ' | '.join(f'S={s}' for s in counts) + ' |', '|---|' + '---:|' * len(counts)] + rows
        + ['| (no sharing) | ' + ' | '.join(f'{100 * s / depth:.1f}' for s in counts) + ' |'])


def digits_init_distance(dense: VisionTransformer, seed: int) -> str:
    """How far training moved the digits ViT's attention weights from their random init, rebuilt from the seed as
    `train_digits_vit` draws it, and how much the blocks share in the trained weights W, the init W0 and W - W0."""
    torch.manual_seed(seed)
    digits_tensors('train')  # train_digits_vit loads the data before building the model (no random draws, kept)
    init = VisionTransformer(**DIGITS_VIT).state_dict()
    sd = dense.state_dict()
    depth, d = len(dense.blocks), dense.embed_dim

    def role(state, kind, i):
        key, j = ('proj', 0) if kind == 'o' else ('qkv', 'qkv'.index(kind))
        return state[f'blocks.{i}.attn.{key}.weight'][j * d:(j + 1) * d].double()

    lines = ['| proj | rel. distance mean | min | max | norm W / norm W0 | W0 share of energy |',
             '|---|---:|---:|---:|---:|---:|']
    stacks = []
    for kind in 'qkvo':
        w = torch.stack([role(sd, kind, i) for i in range(depth)])
        w0 = torch.stack([role(init, kind, i) for i in range(depth)])
        rel = ((w - w0).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)).tolist()
        ratio = (w.flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1)).mean().item()
        # energy of W along its init direction: <W, W0>^2 / (|W|^2 |W0|^2), mean over blocks
        cos2 = ((w * w0).flatten(1).sum(1).square() / (w.flatten(1).square().sum(1) * w0.flatten(1).square().sum(1)))
        lines.append(f'| {kind} | {sum(rel) / depth:.3f} | {min(rel):.3f} | {max(rel):.3f} | {ratio:.2f} | '
                     f'{100 * cos2.mean().item():.0f}% |')
        stacks += [(f'{kind}: W', w), (f'{kind}: W0 (init)', w0), (f'{kind}: W - W0', w - w0)]
    counts = (1, depth // 3, depth // 2)
    share = ['| stack | ' + ' | '.join(f'S={s}' for s in counts) + ' |', '|---|' + '---:|' * len(counts)]
    share += _energy_rows(stacks, counts)
    share.append('| (no sharing) | ' + ' | '.join(f'{100 * s / depth:.1f}' for s in counts) + ' |')
    return '\n'.join(['Distance of the trained attention weights from their random init (relative ||W - W0|| / ||W|| '
                      'per block; W0 share of energy: cos^2 between W and W0):', ''] + lines
                     + ['', 'Energy captured by S Matrix PCA atoms (%, one group) in the trained weights, the init and '
                        'the training update:', ''] + share)


# ---------------------------------------------------------------------------------------------------

class Evaluator:
    """Compares a model with the dense one on held-out labelled batches (top-1, agreement, KL of the logits, and
    pooled-feature fidelity) and, when given, on unlabelled natural images (feature fidelity only)."""

    def __init__(self, dense: nn.Module, val, natural=None):
        self.val, self.natural = val, natural
        self.targets = torch.cat([y for _, y in val])
        self.dense_feats, self.dense_logits = pooled_features(dense, val)
        self.dense_natural = pooled_features(dense, natural)[0] if natural is not None else None

    def __call__(self, model: nn.Module) -> Dict[str, Any]:
        feats, logits = pooled_features(model, self.val)
        out = _compare_logits(self.dense_logits, logits, self.targets)
        out.update(feature_fidelity(self.dense_feats, feats))
        if self.natural is not None:
            out.update({f'natural_{k}': v for k, v in
                        feature_fidelity(self.dense_natural, pooled_features(model, self.natural)[0]).items()})
        return out


def default_rows(args) -> set:
    """The rows the flags select when --rows is not given (the digits benchmark's full set)."""
    rows = {'svd', 'svd_llm', 'svd_llm_roles', 'joint_objective', 'joint_kl'}
    if not args.no_old_rows:
        rows |= {'mpca', 'mpca_refine', 'mpca_refine_auto'}
    if args.bcd_sweeps:
        rows.add('joint_bcd')
    if not args.no_sequential:
        rows |= {'svd_llm_seq', 'svd_llm_seq_input', 'mpca_refine_seq', 'mpca_refine_seq_input', 'joint_seq'}
        if args.atom_rounds:
            rows.add('joint_rounds')
    return rows


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bert_energy:
        print(bert_energy(args.bert_energy))
        return
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    dense, calib, val, setup = load_user_setup(args) if args.model else load_digits_setup(args)
    if not isinstance(dense, VisionTransformer):
        raise SystemExit(f'{type(dense).__name__} is not a timm VisionTransformer')

    img_size = dense.patch_embed.img_size[0]
    natural = None
    if args.natural_crops:
        mean = dense.pretrained_cfg.get('mean', IMAGENET_MEAN) if args.model else DIGITS_MEAN
        std = dense.pretrained_cfg.get('std', IMAGENET_STD) if args.model else DIGITS_STD
        natural = batches(natural_crops(args.natural_crops, img_size, mean, std, seed=args.seed), None,
                          args.batch_size)
    evaluator = Evaluator(dense, val, natural)
    dense_eval = evaluator(dense)
    _logger.info('dense: %s', dense_eval)
    stats = collect_calibration(dense, calib)
    # how much the blocks share: energy of each projection's weights captured by S Matrix PCA atoms (one group)
    depth = len(dense.blocks)
    sd = dense.state_dict()
    d = dense.embed_dim
    counts = sorted({s for s in (1, 2, 3, depth // 3, depth // 2) if 1 <= s <= depth})
    stacks = [(kind, torch.stack([sd[f'blocks.{i}.attn.{key}.weight'][rows * d:(rows + 1) * d] for i in range(depth)]))
              for kind, key, rows in (('q', 'qkv', 0), ('k', 'qkv', 1), ('v', 'qkv', 2), ('o', 'proj', 0))]
    share_table = '\n'.join([
        f'Energy of the dense attention weights captured by S Matrix PCA atoms (%, one group of {depth} blocks; '
        f'blocks that share nothing give 100 S / {depth}):', '',
        '| proj | ' + ' | '.join(f'S={s}' for s in counts) + ' |', '|---|' + '---:|' * len(counts)]
        + _energy_rows(stacks, counts)
        + ['| (no sharing) | ' + ' | '.join(f'{100 * s / depth:.1f}' for s in counts) + ' |'])
    results = []

    def run(name, budget, fn):
        t0 = time.perf_counter()
        model = fn()
        seconds = time.perf_counter() - t0
        ev = evaluator(model)
        rep = model.conversion_report
        row = dict(method=name, target=budget, attention=rep['params']['attention'],
                   attention_dense=rep['params']['attention_dense'],
                   compression=rep['params']['attention_compression'], seconds=seconds, **ev)
        cfg = rep.get('config') or {}
        row['detail'] = (f"S={cfg.get('num_atoms')}, groups={cfg.get('groups')}, ranks={cfg.get('refine_rank')}"
                         if cfg else f"rank={rep.get('rank')}")
        if rep.get('plan_candidates'):
            row['plan'] = dict(candidates=rep['plan_candidates'], lowrank_only=rep.get('plan_lowrank_only'))
        results.append(row)
        _logger.info('%-28s %.0f%%: top1 %.2f agree %.2f KL %.3g feat cos %.4f params %d (%s) %.0fs', name,
                     100 * budget, 100 * row.get('top1', float('nan')), 100 * row['agreement'], row['mean_kl'],
                     row['feat_cos'], row['attention'], row['detail'], seconds)

    it, sweeps = args.refine_iters, args.bcd_sweeps
    rows = set(args.rows) if args.rows else default_rows(args)
    joint = f'Matrix PCA + joint refine (L-BFGS {it}, S by calib KL)'
    for budget in args.budgets:
        svd_ok = lowrank_rank_for_budget(dense, budget) >= 1
        if svd_ok and 'svd' in rows:
            run('truncated SVD', budget, lambda: svd_from_dense(dense, budget))
        if svd_ok and 'svd_llm' in rows:
            run('whitened SVD (SVD-LLM)', budget, lambda: svd_from_dense(dense, budget, stats=stats))
        if svd_ok and 'svd_llm_bc' in rows:
            run('whitened SVD (SVD-LLM), bias-corrected', budget,
                lambda: svd_from_dense(dense, budget, stats=stats, bias_correction=True))
        if 'svd_llm_roles' in rows:
            # the plan's no-atom reference: the whole budget in whitened low rank, one rank per role
            ranks0 = from_dense(dense, budget, stats=stats, refine=True, refine_iters=0).conversion_report[
                'plan_lowrank_only']['refine_rank']
            run('whitened SVD, per-role ranks', budget,
                lambda: whitened_svd_per_role(dense, stats, ranks0, count_params(dense)['attention']))
        if 'mpca' in rows:
            run('Matrix PCA', budget, lambda: from_dense(dense, budget, refine=False))
        if 'mpca_refine' in rows:
            run('Matrix PCA + refine', budget, lambda: from_dense(dense, budget, stats=stats, refine=True,
                                                                  refine_iters=0))
        if 'mpca_refine_bc' in rows:
            run('Matrix PCA + refine, bias-corrected', budget,
                lambda: from_dense(dense, budget, stats=stats, refine=True, refine_iters=0, bias_correction=True))
        if 'mpca_refine_auto' in rows:
            run('Matrix PCA + refine, auto groups', budget,
                lambda: from_dense(dense, budget, stats=stats, refine=True, groups='auto', refine_iters=0))
        if 'joint_objective' in rows:
            run(f'Matrix PCA + joint refine (L-BFGS {it}, S by objective)', budget,
                lambda: from_dense(dense, budget, stats=stats, refine=True, refine_iters=it, select='objective'))
        if 'joint_kl' in rows:
            run(joint, budget, lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl'))
        if 'joint_kl_bc' in rows:
            run(f'{joint}, bias-corrected', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl', bias_correction=True))
        if 'joint_bcd' in rows:
            run(f'Matrix PCA + joint refine (BCD {sweeps} sweeps, S by calib KL)', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=sweeps, refine_method='bcd',
                                   select='calib_kl'))
        # sequential calibration: block by block, refit on the converted model's own activations
        for target in ('dense', 'input'):
            tag, key = ('sequential', 'seq') if target == 'dense' else ('sequential, input target', 'seq_input')
            if svd_ok and f'svd_llm_{key}' in rows:
                run(f'whitened SVD (SVD-LLM), {tag}', budget,
                    lambda: svd_from_dense(dense, budget, calib=calib, sequential=True, sequential_target=target))
            if f'mpca_refine_{key}' in rows:
                run(f'Matrix PCA + refine, {tag}', budget,
                    lambda: from_dense(dense, budget, calib=calib, refine=True, refine_iters=0, sequential=True,
                                       sequential_target=target))
        if svd_ok and 'svd_llm_seq_bc' in rows:
            run('whitened SVD (SVD-LLM), sequential, bias-corrected', budget,
                lambda: svd_from_dense(dense, budget, calib=calib, sequential=True, bias_correction=True))
        if 'mpca_refine_seq_bc' in rows:
            run('Matrix PCA + refine, sequential, bias-corrected', budget,
                lambda: from_dense(dense, budget, calib=calib, refine=True, refine_iters=0, sequential=True,
                                   bias_correction=True))
        if 'joint_seq' in rows:
            run(f'{joint}, sequential', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl', sequential=True))
        if 'joint_rounds' in rows:
            run(f'{joint}, sequential + {args.atom_rounds} atom rounds', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl', sequential=True,
                                   sequential_atom_rounds=args.atom_rounds))

    total = time.perf_counter() - t_start
    nat = natural is not None
    lines = [
        f"Dense: {setup['model']}; top-1 {100 * dense_eval['top1']:.2f}% on {dense_eval['num_images']} held-out "
        f"images; attention params {results[0]['attention_dense']:,}."
        + (f" Linear probe: {setup['probe']['method']}, {setup['probe']['train_images']} train images, train top-1 "
           f"{100 * setup['probe']['train_top1']:.2f}%." if setup.get('probe') else '')
        + (f" Feature columns: pooled features vs the dense model's, on the held-out images and on "
           f"{args.natural_crops} crops of the sample photos (nat.)." if nat else ''), '',
        '| budget | method | top-1 | agreement | mean KL | feat cos | feat rel L2 |' + (' nat. cos | nat. rel L2 |' if nat
                                                                                     else '')
        + ' attention params | compression | config | seconds |',
        '|---:|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if nat else '') + '---:|---:|---|---:|',
    ]
    for r in results:
        lines.append(
            f"| {100 * r['target']:.0f}% | {r['method']} | {100 * r['top1']:.2f} | {100 * r['agreement']:.2f} | "
            f"{r['mean_kl']:.2e} | {r['feat_cos']:.4f} | {r['feat_rel_l2']:.4f} | "
            + (f"{r['natural_feat_cos']:.4f} | {r['natural_feat_rel_l2']:.4f} | " if nat else '')
            + f"{r['attention']:,} | {100 * r['compression']:.1f}% | {r['detail']} | {r['seconds']:.0f} |")
    plan_lines = [
        'Budget plan of the joint refinement rows (relative whitened output energy left, summed over layers, mean over '
        'roles; lower is better): Matrix PCA + low rank -> after joint refinement [-> KL on the calibration images], '
        'per atom count refined; no atoms: the whole budget in whitened low rank with per-role ranks.', '',
        '| budget | method | candidates | no atoms |', '|---:|---|---|---:|']
    for r in results:
        if 'joint' in r['method'] and r.get('plan'):
            cands = ', '.join(f"S={c['num_atoms']}: {c['score']:.3g} -> {c['refined_score']:.3g}"
                              + (f" -> {c['judged']:.3g}" if 'judged' in c else '')
                              for c in r['plan']['candidates'] if 'refined_score' in c)
            ref = r['plan']['lowrank_only']
            plan_lines.append(f"| {100 * r['target']:.0f}% | {r['method']} | {cands} | "
                              + (f"{ref['score']:.3g} |" if ref else '- |'))
    table = '\n'.join(lines) + '\n\n' + share_table + '\n\n' + '\n'.join(plan_lines)
    if not args.model:
        init_table = digits_init_distance(dense, args.seed)
        table += '\n\n' + init_table
    print(table)
    print(f'\ntotal {total:.0f}s (dense model: {setup["source"]}), torch threads {torch.get_num_threads()}')
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, 'bench_conversion.json')
    with open(out, 'w') as f:
        json.dump(dict(setup=setup, dense=dense_eval, results=results, seconds=total, share_table=share_table,
                       init_table=init_table if not args.model else None,
                       threads=torch.get_num_threads(), argv=sys.argv[1:]), f, indent=2, default=str)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
