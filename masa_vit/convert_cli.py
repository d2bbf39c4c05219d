""" masa-convert: convert a pretrained timm ViT into a MASA ViT without training.

    masa-convert vit_base_patch16_224 --checkpoint vit_b.pth --attn-compression 0.2 \\
        --calib-dir calib_images/ --eval-dir val/ --output vit_b_masa.safetensors

writes the converted weights (safetensors, with the MASA and source-model options in its metadata, see
`masa_vit.conversion.load_converted`), a JSON report (`--report`, default next to the output) and the same report
as markdown (.md). `--pretrained` uses timm's own pretrained weights for the model name instead of a file (online).
"""
import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import torch

import timm
from timm.models import VisionTransformer, load_state_dict
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from timm.utils import ParseKwargs

from .conversion import from_dense, report_to_markdown, save_converted

_logger = logging.getLogger('masa_convert')


class ConvertError(ValueError):
    """Input that cannot be converted (wrong checkpoint, empty folder, non-ViT model...)."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='masa-convert', description='Training-free conversion of a timm ViT into a MASA ViT (Matrix PCA '
                                         '+ whitened low-rank refinement).')
    p.add_argument('model', help='timm model name of the dense source, e.g. vit_base_patch16_224')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', help='local dense checkpoint (.pth, .bin, .safetensors)')
    src.add_argument('--pretrained', action='store_true', help="timm's pretrained weights for the name (online)")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra timm.create_model arguments, e.g. img_size=384 num_classes=10')
    tgt = p.add_mutually_exclusive_group(required=True)
    tgt.add_argument('--attn-compression', type=float, help='fraction of attention parameters to remove, e.g. 0.2')
    tgt.add_argument('--atoms', help='atoms per group: one int, or one per group (4,4)')
    p.add_argument('--groups', default='1', help="number of groups, start indices (0,6), or 'auto' (KL drift)")
    p.add_argument('--auto-groups', type=int, default=2, help="groups for --groups auto")
    p.add_argument('--share', default='qkvo', help="projections to share (default qkvo)")
    p.add_argument('--dictionary', default='separate', choices=('separate', 'common'))
    p.add_argument('--refine', action=argparse.BooleanOptionalAction, default=None,
                   help='whitened low-rank refinement (default: on when calibration images are given)')
    p.add_argument('--refine-rank', type=int, default=None, help='refinement rank with --atoms (else: from budget)')
    p.add_argument('--refine-iters', type=int, default=None,
                   help='joint refinement iterations of atoms, coefficients and low rank (default 0: Matrix PCA '
                        'atoms as they are; 300 was best on the digits benchmark, hours for a ViT-B on a CPU)')
    p.add_argument('--refine-method', default='lbfgs', choices=('lbfgs', 'bcd'),
                   help='joint refinement optimizer: L-BFGS or block coordinate descent sweeps')
    p.add_argument('--select', default=None, choices=('objective', 'calib_kl'),
                   help='compare atom counts by the whitened objective or by KL on the calibration images '
                        '(default: calib_kl with calibration images and a budget)')
    p.add_argument('--sequential', action='store_true',
                   help='sequential calibration: refit each block in order on the converted model\'s own activations')
    p.add_argument('--sequential-target', default='dense', choices=('dense', 'input'),
                   help='sequential refit towards the dense outputs (default) or the dense weight on the '
                        'converted inputs')
    p.add_argument('--sequential-atom-rounds', type=int, default=0,
                   help='with --sequential and --refine-iters: rounds refitting the shared atoms on sequential '
                        'statistics, each kept only when it lowers the calibration KL')
    p.add_argument('--bias-correction', action='store_true',
                   help='fit on the centered input covariance and move each layer\'s mean output error into its '
                        'bias (the affine fit; no extra parameters; with --sequential the refit is affine too)')
    p.add_argument('--calib-dir', help='calibration image folder (any layout; images are found recursively)')
    p.add_argument('--calib-images', type=int, default=256, help='calibration images to use')
    p.add_argument('--eval-dir', help='held-out image folder with one sub-folder per class, in the model class order')
    p.add_argument('--eval-images', type=int, default=None, help='cap on held-out images')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--seed', type=int, default=0, help='seed of the calibration image subset')
    p.add_argument('--output', required=True, help='output .safetensors file')
    p.add_argument('--report', default=None, help='JSON report (default: OUTPUT with .json); markdown next to it')
    p.add_argument('-v', '--verbose', action='store_true')
    return p.parse_args(argv)


def _int_list(text: str) -> List[int]:
    try:
        return [int(t) for t in text.replace(' ', '').split(',') if t]
    except ValueError as e:
        raise ConvertError(f'expected an int or comma separated ints, got {text!r}') from e


def load_dense(name: str, checkpoint: Optional[str], pretrained: bool, **kwargs) -> VisionTransformer:
    """A dense timm ViT with weights from a local checkpoint (shape-checked) or timm's pretrained tag."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ConvertError(f'checkpoint file {checkpoint} does not exist')
    state = None
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = state.get('head.weight')
        if head is not None and 'num_classes' not in kwargs:
            kwargs['num_classes'] = head.shape[0]
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise ConvertError(str(e)) from e
    if not isinstance(model, VisionTransformer):
        raise ConvertError(f'{name} is a {type(model).__name__}, not a ViT: masa-convert converts timm '
                           f'VisionTransformer models (vit_*, deit_*, ...)')
    if state is not None:
        state = vit_checkpoint_filter_fn(state, model)
        target = model.state_dict()
        bad = [f'{k} {tuple(v.shape)} (model needs {tuple(target[k].shape)})' for k, v in state.items()
               if k in target and target[k].shape != v.shape]
        missing = sorted(set(target) - set(state))
        if bad or missing:
            raise ConvertError(
                f'checkpoint {checkpoint} does not fit {name}' + (f' {kwargs}' if kwargs else '') + ': '
                + '; '.join(bad[:3] + ([f'missing {", ".join(missing[:3])}'] if missing else []))
                + ('. Pass --model-kwargs for a non-default shape, or the model name the checkpoint was trained as.'))
        model.load_state_dict(state, strict=False)
    return model.eval()


def image_loader(folder: str, model: torch.nn.Module, limit: Optional[int], batch_size: int, workers: int,
                 seed: int, what: str):
    """A DataLoader over the images of `folder` (recursively) with the model's eval transform."""
    from timm.data import ImageDataset, create_transform, resolve_data_config
    if not os.path.isdir(folder):
        raise ConvertError(f'{what} folder {folder} does not exist')
    # the model's own input size (the pretrained cfg of the name may give another one when img_size was overridden)
    size = getattr(model.patch_embed, 'img_size', None)
    args = {'input_size': (model.patch_embed.proj.in_channels, *size)} if size is not None else {}
    transform = create_transform(**resolve_data_config(args, model=model))
    try:
        ds = ImageDataset(folder, transform=transform)
    except RuntimeError as e:
        raise ConvertError(f'{what} folder {folder} holds no images (.png, .jpg, .jpeg, ...)') from e
    if len(ds) == 0:
        raise ConvertError(f'{what} folder {folder} holds no images (.png, .jpg, .jpeg, ...)')
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = torch.utils.data.Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:limit].tolist()))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def run(args: argparse.Namespace) -> dict:
    dense = load_dense(args.model, args.checkpoint, args.pretrained, **args.model_kwargs).to(args.device)
    calib = image_loader(args.calib_dir, dense, args.calib_images, args.batch_size, args.workers, args.seed,
                         'calibration') if args.calib_dir else None
    eval_data = image_loader(args.eval_dir, dense, args.eval_images, args.batch_size, args.workers, args.seed,
                             'evaluation') if args.eval_dir else None
    groups = args.groups.strip()
    groups = 'auto' if groups == 'auto' else (int(groups) if groups.isdigit() else _int_list(groups))
    num_atoms = None
    if args.atoms is not None:
        num_atoms = _int_list(args.atoms)
        num_atoms = num_atoms[0] if len(num_atoms) == 1 else num_atoms
    model = from_dense(
        dense, attn_compression=args.attn_compression, num_atoms=num_atoms, groups=groups, calib=calib,
        refine=args.refine, refine_rank=args.refine_rank, share=args.share, dictionary=args.dictionary,
        auto_groups=args.auto_groups, eval_data=eval_data, refine_iters=args.refine_iters,
        refine_method=args.refine_method, select=args.select, sequential=args.sequential,
        sequential_target=args.sequential_target, sequential_atom_rounds=args.sequential_atom_rounds,
        bias_correction=args.bias_correction)
    report = dict(model.conversion_report, source=dict(
        model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, model_kwargs=args.model_kwargs))
    save_converted(model, args.output, source_model=args.model, source_kwargs=args.model_kwargs)
    report_path = args.report or os.path.splitext(args.output)[0] + '.json'
    with open(report_path, 'w') as f:
        json.dump(report, f, indent=2, default=str)
    md_path = os.path.splitext(report_path)[0] + '.md'
    with open(md_path, 'w') as f:
        f.write(report_to_markdown(report))
    _logger.info('wrote %s, %s, %s', args.output, report_path, md_path)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format='%(message)s')
    try:
        report = run(args)
    except (ConvertError, ValueError, TypeError) as e:
        _logger.error('masa-convert: error: %s', e)
        return 2
    sys.stdout.write(report_to_markdown(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
