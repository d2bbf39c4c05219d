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

and reports top-1, agreement with the dense model, mean KL(dense || converted) on held-out images, and attention
parameters. Prints a markdown table and writes JSON.

    python benchmarks/bench_conversion.py                      # digits ViT (trained, then cached in --out)
    python benchmarks/bench_conversion.py --model vit_small_patch16_224 --checkpoint vit_s.pth --data-dir imagenet/
    python benchmarks/bench_conversion.py --bert-energy model.safetensors    # atom energy of a BERT's attention only

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

import torch
import torch.nn.functional as F

import timm
from timm.models import VisionTransformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from masa_vit.conversion import (  # noqa: E402
    collect_calibration, evaluate_agreement, from_dense, lowrank_rank_for_budget, predict_logits, svd_from_dense,
)
from masa_vit.masa_vision_transformer import count_params  # noqa: E402
from masa_vit.matrix_pca import matrix_pca_spectrum, whitened_lowrank  # noqa: E402

_logger = logging.getLogger('bench_conversion')

DIGITS_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, num_classes=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='output/bench_conversion', help='output folder (JSON, cached dense model)')
    p.add_argument('--budgets', type=float, nargs='+', default=[0.2, 0.3, 0.5, 0.7], help='attention compression ratios')
    p.add_argument('--calib-images', type=int, default=256, help='calibration images (from the training split)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    g = p.add_argument_group('digits model')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('--retrain', action='store_true', help='train even if a cached dense model exists')
    g = p.add_argument_group('your own model')
    g.add_argument('--model', default=None, help='timm ViT name (with --checkpoint and --data-dir)')
    g.add_argument('--checkpoint', default=None, help='dense checkpoint file for --model')
    g.add_argument('--data-dir', default=None, help='image folder with train/ and val/ class folders')
    g.add_argument('--batch-size', type=int, default=64)
    g.add_argument('--eval-images', type=int, default=None, help='cap on held-out images')
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

def digits_tensors(split: str):
    """The bundled digits split as normalized (N, 3, 32, 32) tensors and labels (masa_vit.data.DigitsDataset)."""
    from torchvision.transforms import functional as TF
    from masa_vit.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
    ds = DigitsDataset(split=split)
    x = torch.stack([TF.normalize(TF.to_tensor(img), DIGITS_MEAN, DIGITS_STD) for img in ds.images])
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


def load_user_setup(args):
    from masa_vit.data import create_dataset
    if not (args.checkpoint and args.data_dir):
        raise SystemExit('--model needs --checkpoint and --data-dir')
    dense = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint)).eval()
    cfg = timm.data.resolve_data_config({}, model=dense)
    tf = timm.data.create_transform(**cfg)

    def loader(split, limit):
        ds = create_dataset('', root=args.data_dir, split=split, transform=tf)
        if limit is not None and limit < len(ds):
            g = torch.Generator().manual_seed(args.seed)
            ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=2)
    return dense, loader('train', args.calib_images), loader('val', args.eval_images), dict(
        model=args.model, source=args.checkpoint, eval_images=None)


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

    dense_logits, _ = predict_logits(dense, val)
    dense_eval = evaluate_agreement(dense, dense, val, dense_logits=dense_logits)
    _logger.info('dense: %s', dense_eval)
    stats = collect_calibration(dense, calib)
    # how much the blocks share: energy of each projection's weights captured by S Matrix PCA atoms (one group)
    depth = len(dense.blocks)
    sd = dense.state_dict()
    share_lines = []
    for kind, key, rows in (('q', 'qkv', 0), ('k', 'qkv', 1), ('v', 'qkv', 2), ('o', 'proj', 0)):
        d = dense.embed_dim
        stack = torch.stack([sd[f'blocks.{i}.attn.{key}.weight'][rows * d:(rows + 1) * d] for i in range(depth)])
        eig = matrix_pca_spectrum(stack)
        frac = (eig.cumsum(0) / eig.sum()).tolist()
        share_lines.append(f"| {kind} | " + ' | '.join(f'{100 * frac[s - 1]:.1f}' for s in (1, depth // 3, depth // 2))
                           + ' |')
    share_table = '\n'.join([
        f'Energy of the dense attention weights captured by S Matrix PCA atoms (%, one group of {depth} blocks; '
        f'blocks that share nothing give 100 S / {depth}):', '',
        f'| proj | S=1 | S={depth // 3} | S={depth // 2} |', '|---|---:|---:|---:|'] + share_lines
        + [f'| (no sharing) | {100 / depth:.1f} | {100 * (depth // 3) / depth:.1f} | {100 * (depth // 2) / depth:.1f} |'])
    results = []

    def run(name, budget, fn):
        t0 = time.perf_counter()
        model = fn()
        seconds = time.perf_counter() - t0
        ev = evaluate_agreement(dense, model, val, dense_logits=dense_logits)
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
        _logger.info('%-28s %.0f%%: top1 %.2f agree %.2f KL %.4f params %d (%s)', name, 100 * budget,
                     100 * row.get('top1', float('nan')), 100 * row['agreement'], row['mean_kl'], row['attention'],
                     row['detail'])

    it, sweeps = args.refine_iters, args.bcd_sweeps
    for budget in args.budgets:
        if lowrank_rank_for_budget(dense, budget) >= 1:
            run('truncated SVD', budget, lambda: svd_from_dense(dense, budget))
            run('whitened SVD (SVD-LLM)', budget, lambda: svd_from_dense(dense, budget, stats=stats))
        # the plan's no-atom reference: the whole budget in whitened low rank, one rank per role
        ranks0 = from_dense(dense, budget, stats=stats, refine=True, refine_iters=0).conversion_report[
            'plan_lowrank_only']['refine_rank']
        run('whitened SVD, per-role ranks', budget,
            lambda: whitened_svd_per_role(dense, stats, ranks0, count_params(dense)['attention']))
        if not args.no_old_rows:
            run('Matrix PCA', budget, lambda: from_dense(dense, budget, refine=False))
            run('Matrix PCA + refine', budget, lambda: from_dense(dense, budget, stats=stats, refine=True,
                                                                  refine_iters=0))
            run('Matrix PCA + refine, auto groups', budget,
                lambda: from_dense(dense, budget, stats=stats, refine=True, groups='auto', refine_iters=0))
        run(f'Matrix PCA + joint refine (L-BFGS {it}, S by objective)', budget,
            lambda: from_dense(dense, budget, stats=stats, refine=True, refine_iters=it, select='objective'))
        run(f'Matrix PCA + joint refine (L-BFGS {it}, S by calib KL)', budget,
            lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl'))
        if sweeps:
            run(f'Matrix PCA + joint refine (BCD {sweeps} sweeps, S by calib KL)', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=sweeps, refine_method='bcd',
                                   select='calib_kl'))
        if not args.no_sequential:
            # sequential calibration: block by block, refit on the converted model's own activations
            for target in ('dense', 'input'):
                tag = 'sequential' + ('' if target == 'dense' else ', input target')
                if lowrank_rank_for_budget(dense, budget) >= 1:
                    run(f'whitened SVD (SVD-LLM), {tag}', budget,
                        lambda: svd_from_dense(dense, budget, calib=calib, sequential=True, sequential_target=target))
                run(f'Matrix PCA + refine, {tag}', budget,
                    lambda: from_dense(dense, budget, calib=calib, refine=True, refine_iters=0, sequential=True,
                                       sequential_target=target))
            run(f'Matrix PCA + joint refine (L-BFGS {it}, S by calib KL), sequential', budget,
                lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl', sequential=True))
            if args.atom_rounds:
                run(f'Matrix PCA + joint refine (L-BFGS {it}, S by calib KL), sequential + {args.atom_rounds} atom '
                    'rounds', budget,
                    lambda: from_dense(dense, budget, calib=calib, refine_iters=it, select='calib_kl', sequential=True,
                                       sequential_atom_rounds=args.atom_rounds))

    total = time.perf_counter() - t_start
    lines = [
        f"Dense: {setup['model']}; top-1 {100 * dense_eval['top1']:.2f}% on {dense_eval['num_images']} held-out "
        f"images; attention params {results[0]['attention_dense']:,}.", '',
        '| budget | method | top-1 | agreement | mean KL | attention params | compression | config | seconds |',
        '|---:|---|---:|---:|---:|---:|---:|---|---:|',
    ]
    for r in results:
        lines.append(
            f"| {100 * r['target']:.0f}% | {r['method']} | {100 * r['top1']:.2f} | {100 * r['agreement']:.2f} | "
            f"{r['mean_kl']:.2e} | {r['attention']:,} | {100 * r['compression']:.1f}% | {r['detail']} | "
            f"{r['seconds']:.0f} |")
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
