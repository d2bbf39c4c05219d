""" MASA ViT training and evaluation, in the shape of timm's train.py

    python train_vit.py --config configs/demo_digits.yaml [--any-flag value ...]
    torchrun --nproc_per_node=8 train_vit.py --config configs/imagenet_masa_vit_small.yaml --data-dir /data/imagenet
    python train_vit.py --config X.yaml --eval-only --resume run/model_best.pth.tar --output DIR   # or masa-validate

A first parser reads `--config`; the YAML file's keys are the flags' names (`batch_size`, `model_kwargs`, ...) and
become the defaults of the main parser (an unknown key is an error naming it); flags given on the command line win.
The resolved arguments are saved as `args.yaml` in the run's output folder, which also holds TensorBoard event files,
timm's `summary.csv` and the checkpoints (`last.pth.tar`, `model_best.pth.tar`, `checkpoint-N.pth.tar`).

Everything a timm user knows comes from timm: datasets, transforms, loaders and Mixup (`timm.data`), losses
(`timm.loss`), optimizers with layer-wise lr decay (`timm.optim.create_optimizer_v2`), schedules
(`timm.scheduler.create_scheduler_v2`), model EMA, checkpoint history, metrics and summary (`timm.utils`). This module
adds what a MASA run needs on top: restoring the MASA options of a checkpoint when fine-tuning, MASA coefficient
heatmaps in TensorBoard, bit-exact resume (RNG states and the data order are checkpointed), a resumable checkpoint on
SIGTERM / SIGINT, safe checkpoint loading, and clear errors for bad input.
"""
import argparse
import difflib
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.data import FastCollateMixup, Mixup, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, ModelEmaV3, accuracy, dispatch_clip_grad, distribute_bn, init_distributed_device, random_seed,
    reduce_tensor, setup_default_logging, trim_summary, unwrap_model, update_summary,
)

from .checkpoint import (
    CheckpointError, CheckpointSaver, checkpoint_model_info, checkpoint_state_dict, get_rng_state,
    load_checkpoint_file, set_rng_state,
)
from .data import (
    BadImageError, DataError, create_dataset, create_loader, dataset_classes, set_loader_epoch, skipped_images,
)
from .monitor import log_coefficients, log_param_counts, param_counts

__all__ = ['main', 'validate_main', 'train_one_epoch', 'validate', 'TrainError', 'NonFiniteLossError']

_logger = logging.getLogger('train')


class TrainError(Exception):
    """Bad input (config, data, checkpoint, class count) reported as one clear line, nothing lost."""


class NonFiniteLossError(TrainError):
    """The loss became NaN / inf; training stopped before that step changed any weight."""


def _build_parsers():
    # The first arg parser parses out only the --config argument, the YAML file it names gives the defaults of the
    # main parser (as in timm's train.py)
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')

    parser = argparse.ArgumentParser(description='MASA ViT training and evaluation (timm train.py flags)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file specifying default arguments (keys are the flag names)')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default='',
                       help='path to dataset root (ImageNet-style folder: ROOT/train/<class>/*, ROOT/val/<class>/*)')
    group.add_argument('--dataset', '-d', metavar='NAME', default='',
                       help="dataset: '' or 'folder' (image folder), 'digits' (bundled, offline), 'torch/cifar10', "
                            "'torch/cifar100' or any timm dataset name")
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='val', help='dataset validation split (default: val)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of torch/ datasets (needs network access)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')
    group.add_argument('--bad-images', default='error', choices=('error', 'skip'),
                       help='unreadable image files in folder datasets: stop naming the file, or skip and count them')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='masa_vit_small', type=str, metavar='MODEL',
                       help='name of model to train (default: "masa_vit_small")')
    group.add_argument('--model-kwargs', default={}, action=_MergeKwargs, nargs='*', metavar='KEY=VALUE',
                       help='model options, e.g. num_atoms=4 share=qkvo embed_dim=64 (merged into the config\'s)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start with the timm pretrained weights of --model (a timm tag, e.g. '
                            'vit_small_patch16_224.augreg_in21k_ft_in1k)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='initialize model weights (and MASA options) from this checkpoint / .safetensors file; '
                            'a different --num-classes gets a new head')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume full model and optimizer state from checkpoint; with --eval-only, the weights '
                            'to evaluate')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: the number of classes of the dataset)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pool type (token, avg, ...). Model default if None.')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size for the data pipeline (default: the model\'s)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                       help='input all image dimensions (d h w, e.g. --input-size 3 224 224)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='input batch size per process for training (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='use channels_last memory layout')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through model blocks')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='the number of steps to accumulate gradients (default: 1)')

    group = parser.add_argument_group('Device, precision and compilation')
    group.add_argument('--device', default='', type=str,
                       help="device to train on (default: 'cuda' when available, else 'cpu')")
    group.add_argument('--amp', action='store_true', default=False,
                       help='use mixed precision (CUDA only; ignored with a warning on CPU)')
    group.add_argument('--amp-dtype', default='bfloat16', type=str, choices=('bfloat16', 'float16'),
                       help='lower precision AMP dtype (default: bfloat16; float16 uses a gradient scaler)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='enable torch.compile() with this backend (default backend when given: inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode (default: None)')
    group.add_argument('--threads', type=int, default=None, metavar='N',
                       help='torch intra-op CPU threads per process (default: torch\'s choice)')
    group.add_argument('--dist-backend', default=None, type=str,
                       help='torch.distributed backend (default: nccl on CUDA, gloo on CPU)')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", "")')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='force broadcast buffers for native DDP to off')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER',
                       help='optimizer (default: "adamw"; any timm optimizer, e.g. lamb, sgd)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='optimizer epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='optimizer betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M',
                       help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=0.05,
                       help='weight decay (default: 0.05)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='layer-wise learning rate decay (default: None)')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='apply LR scheduler step on update instead of epoch end')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=5e-4, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=512, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 512)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR',
                       help='warmup learning rate (default: 1e-6)')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 1e-5)')
    group.add_argument('--epochs', type=int, default=300, metavar='N',
                       help='number of epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N',
                       help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports (default: 5)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude warmup period from decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='disable all training augmentation, override other train aug args')
    group.add_argument('--train-crop-mode', type=str, default=None,
                       help='crop-mode in train: "rrc" (default), "rkrc", "rkrr"')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='color jitter factor (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='number of augmentation repetitions (distributed training only) (default: 0)')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='enable BCE loss w/ Mixup/CutMix use')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='do not random erase first (clean) augmentation split')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='how to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (random, bilinear, bicubic default: "random")')
    group.add_argument('--drop', type=float, default=None, metavar='PCT',
                       help='dropout rate (default: None, model default)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='drop path rate (default: None, model default)')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='enable tracking moving average of model weights (ModelEmaV3)')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='force ema to be tracked on CPU')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', default=False,
                       help='enable warmup for model EMA decay')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many optimizer steps between logging training status and TensorBoard scalars')
    group.add_argument('--coef-log-interval', type=int, default=1, metavar='N',
                       help='epochs between MASA coefficient heatmaps in TensorBoard (0: never)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of epoch checkpoints to keep besides last and best (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many data loading processes per training process (default: 4)')
    group.add_argument('--persistent-workers', action='store_true', default=False,
                       help='keep loader workers between epochs (faster epoch start; resume is then not bit-exact '
                            'with workers, as their RNG streams are not checkpointed)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='disable fast prefetcher (it is only used on CUDA)')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='folder for this run\'s outputs (default: ./output/train/<date>-<model>-<size>); with '
                            '--eval-only, where the results JSON goes')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the run\'s sub-folder under --output (default: none with --output)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='metric that picks the best checkpoint: top1, top5, loss, ema_top1 (default: top1)')
    group.add_argument('--eval-only', action='store_true', default=False,
                       help='only evaluate --resume / --initial-checkpoint / --pretrained weights on --val-split and '
                            'write eval_results.json under --output')
    group.add_argument('--eval-ema', action='store_true', default=False,
                       help='with --eval-only, evaluate the checkpoint\'s EMA weights')
    group.add_argument('--tensorboard', action=argparse.BooleanOptionalAction, default=True,
                       help='write TensorBoard event files in the output folder (default: on)')
    group.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                       help='progress bar per epoch (default: on an interactive terminal, log lines otherwise)')
    return config_parser, parser


class _MergeKwargs(argparse.Action):
    """KEY=VALUE pairs (values parsed as Python literals) merged into the dict already there (the YAML's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        kw = dict(getattr(namespace, self.dest, None) or {})
        for value in values:
            if '=' not in value:
                parser.error(f'{option_string} expects KEY=VALUE pairs, got {value!r}')
            key, value = value.split('=', 1)
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


def _check_config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """Validate (and convert) one YAML value the way argparse would treat the flag."""
    key = action.dest
    if value is None:
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise TrainError(f'{where}: {key} must be true or false, not {value!r}')
        return value
    if isinstance(action, _MergeKwargs):
        if not isinstance(value, dict):
            raise TrainError(f'{where}: {key} must be a mapping (e.g. {{num_atoms: 4}}), not {value!r}')
        return value

    def convert(v):
        if action.type in (int, float):
            if isinstance(v, bool):
                raise TrainError(f'{where}: {key} must be a number, not {v!r}')
            try:
                out = action.type(float(v)) if action.type is int else float(v)
            except (TypeError, ValueError):
                raise TrainError(f'{where}: {key} must be a number, not {v!r}') from None
            if action.type is int and out != float(v):
                raise TrainError(f'{where}: {key} must be an integer, not {v!r}')
            return out
        if not isinstance(v, str):
            raise TrainError(f'{where}: {key} must be a string, not {v!r}')
        return v

    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            value = [value]
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise TrainError(f'{where}: {key} needs {action.nargs} values, got {value!r}')
        value = [convert(v) for v in value]
    elif action.nargs != '?' or not isinstance(value, str):
        value = convert(value)
    if action.choices is not None and value not in action.choices:
        raise TrainError(f'{where}: {key} must be one of {list(action.choices)}, not {value!r}')
    return value


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Read a YAML config and check it against the parser: unknown keys and ill-typed values are errors."""
    if not os.path.isfile(path):
        raise TrainError(f'config file {path} not found.')
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise TrainError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise TrainError(f'config file {path} must be a mapping of flag names to values.')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise TrainError(f"{path}: unknown config key '{key}'{hint}. Keys are the command-line flags with '_' "
                             f"for '-', e.g. batch_size; model options go under model_kwargs.")
        out[dest] = _check_config_value(actions[dest], value, path)
    return out


def _parse_args(argv: Optional[Sequence[str]] = None):
    config_parser, parser = _build_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        parser.set_defaults(**load_config_defaults(parser, args_config.config))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    # the resolved configuration: every flag, loadable again with --config
    config = {k: v for k, v in vars(args).items() if k != 'config'}
    return args, config


def _setup_logging() -> None:
    if not logging.root.handlers:
        setup_default_logging()
    elif logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
        logging.root.setLevel(logging.INFO)


class _StopRequest:
    """SIGTERM / SIGINT ask the training loop to finish its step, save a resumable checkpoint and exit.

    A second SIGINT (Ctrl-C twice) stops at once.
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.stopped_at: Optional[Dict[str, int]] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        _logger.warning(f'{self.signal_name} received: stopping after this step to save a resumable checkpoint '
                        f'(Ctrl-C again to stop at once).')

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


def _sync_flags(loss: torch.Tensor, stop: Optional[_StopRequest], args) -> Tuple[float, bool]:
    """Loss averaged over processes and whether any process was asked to stop (one all-reduce per step)."""
    requested = stop is not None and stop.requested
    if not args.distributed:
        return loss.item(), requested
    stats = torch.stack([loss.detach().float(), torch.tensor(float(requested), device=loss.device)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats[0].item() / args.world_size, bool(stats[1].item() > 0)


def _grad_norm_and_clip(parameters: List[torch.Tensor], args) -> torch.Tensor:
    """Total gradient norm (before clipping) and gradient clipping in one pass where possible."""
    if args.clip_grad is not None and args.clip_mode == 'norm':
        return torch.nn.utils.clip_grad_norm_(parameters, args.clip_grad)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if hasattr(torch.nn.utils, 'get_total_norm') else \
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if args.clip_grad is not None:
        dispatch_clip_grad(parameters, args.clip_grad, mode=args.clip_mode)
    return norm


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args,
        device: torch.device,
        lr_scheduler=None,
        model_ema: Optional[ModelEmaV3] = None,
        mixup_fn: Optional[Mixup] = None,
        amp_autocast=suppress,
        loss_scaler: Optional[torch.amp.GradScaler] = None,
        updates_per_epoch: int = 0,
        start_batch: int = 0,
        stop: Optional[_StopRequest] = None,
        writer=None,
) -> Dict[str, float]:
    """Train one epoch (from batch `start_batch` when resuming mid-epoch); returns timm-style metrics.

    Stops early, after a complete optimizer step, when `stop` is requested on any process (`stop.stopped_at` then
    says where). Raises `NonFiniteLossError` before a NaN / inf loss can change the weights.
    """
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and hasattr(loader, 'mixup_enabled'):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    accum_steps = args.grad_accum_steps
    num_batches = len(loader) + start_batch  # the whole epoch, also when starting mid-epoch
    last_accum_steps = num_batches % accum_steps
    last_batch_idx = num_batches - 1
    last_batch_idx_to_accum = num_batches - last_accum_steps
    num_updates = epoch * updates_per_epoch + start_batch // accum_steps
    model_params = [p for p in model.parameters() if p.requires_grad]

    losses_m, grad_norm_m = AverageMeter(), AverageMeter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    show_bar = args.progress
    pbar = None
    if show_bar:
        from tqdm import tqdm
        pbar = tqdm(total=num_batches, initial=start_batch, desc=f'epoch {epoch}', dynamic_ncols=True, leave=False,
                    file=sys.stderr)
    t_epoch = t_log = time.time()
    samples_since_log = samples_epoch = 0
    lr = max(pg['lr'] for pg in optimizer.param_groups)
    grad_norm = None
    batch_idx = start_batch - 1
    for batch_idx, (input, target) in enumerate(loader, start=start_batch):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        step_accum = last_accum_steps if batch_idx >= last_batch_idx_to_accum and last_accum_steps else accum_steps
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        # DDP syncs gradients only on the micro-batch that completes an accumulation
        sync_ctx = model.no_sync if args.distributed and not need_update and hasattr(model, 'no_sync') \
            else nullcontext
        with sync_ctx():
            with amp_autocast():
                output = model(input)
                loss = loss_fn(output, target)
            if step_accum > 1:
                loss = loss / step_accum
            loss_value, stop_requested = _sync_flags(loss, stop, args)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f'non-finite loss ({loss_value}) at epoch {epoch}, batch {batch_idx}, optimizer step '
                    f'{num_updates + 1}; stopped before it changed the weights, the last checkpoint is kept. '
                    f'Try a lower --lr, --clip-grad 1.0, or --amp-dtype bfloat16.')
            if loss_scaler is not None:
                loss_scaler.scale(loss).backward()
            else:
                loss.backward()
        losses_m.update(loss_value * step_accum, input.size(0))
        samples = input.size(0) * args.world_size
        samples_since_log += samples
        samples_epoch += samples
        if pbar is not None:
            pbar.update(1)
        if not need_update:
            continue

        if loss_scaler is not None:
            loss_scaler.unscale_(optimizer)
        grad_norm = _grad_norm_and_clip(model_params, args)
        if loss_scaler is not None:
            loss_scaler.step(optimizer)
            loss_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

        update_idx = batch_idx // accum_steps
        if update_idx % args.log_interval == 0 or last_batch or stop_requested:
            lr = max(pg['lr'] for pg in optimizer.param_groups)
            grad_norm_value = float(grad_norm)
            grad_norm_m.update(grad_norm_value)
            now = time.time()
            img_per_sec = samples_since_log / max(now - t_log, 1e-9)
            t_log, samples_since_log = now, 0
            if writer is not None:
                writer.add_scalar('train/loss', loss_value * step_accum, num_updates)
                writer.add_scalar('train/lr', lr, num_updates)
                writer.add_scalar('train/grad_norm', grad_norm_value, num_updates)
                writer.add_scalar('train/img_per_sec', img_per_sec, num_updates)
            if pbar is not None:
                pbar.set_postfix_str(f'loss {losses_m.val:.4f} ({losses_m.avg:.4f}) lr {lr:.2e} '
                                     f'{img_per_sec:.0f} img/s', refresh=False)
            else:
                done = batch_idx + 1 - start_batch
                eta = (time.time() - t_epoch) / max(done, 1) * (num_batches - batch_idx - 1)
                _logger.info(
                    f'Train: {epoch} [{batch_idx + 1:>{len(str(num_batches))}d}/{num_batches} '
                    f'({100. * (batch_idx + 1) / num_batches:>3.0f}%)]  '
                    f'Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  LR: {lr:.3e}  Grad: {grad_norm_value:.3g}  '
                    f'{img_per_sec:>7.1f} img/s  ETA {_format_eta(eta)}')
        if stop_requested:
            if stop is not None:
                if not stop.requested:
                    stop.signal_name = 'stop on another process'
                stop.stopped_at = dict(epoch=epoch, batch=batch_idx + 1, num_updates=num_updates)
            break

    if pbar is not None:
        pbar.close()
        _logger.info(f'Train: {epoch}  loss {losses_m.avg:#.4g}  lr {lr:.3e}  '
                     f'{samples_epoch / max(time.time() - t_epoch, 1e-9):.1f} img/s  '
                     f'({_format_eta(time.time() - t_epoch)})')
    metrics = OrderedDict([
        ('loss', losses_m.avg),
        ('grad_norm', grad_norm_m.avg if grad_norm_m.count else float('nan')),
        ('img_per_sec', samples_epoch / max(time.time() - t_epoch, 1e-9)),
    ])
    dataset = getattr(loader, 'dataset', None)
    if hasattr(dataset, 'skip_counts'):
        metrics['skipped_images'] = skipped_images(dataset)
    return metrics


def validate(
        model: nn.Module,
        loader,
        loss_fn: nn.Module,
        args,
        device: torch.device,
        amp_autocast=suppress,
        log_suffix: str = '',
) -> Dict[str, float]:
    """Evaluate `model`: loss, top-1, top-5 (%), and images/s of the whole loop and of the forward passes alone."""
    losses_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    num_images = 0
    forward_time = 0.
    t_start = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t_fwd = time.time()
            with amp_autocast():
                output = model(input)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            forward_time += time.time() - t_fwd
            if isinstance(output, (tuple, list)):
                output = output[0]
            output = output.float()
            loss = loss_fn(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            if args.distributed:
                loss = reduce_tensor(loss.data, args.world_size)
                acc1 = reduce_tensor(acc1, args.world_size)
                acc5 = reduce_tensor(acc5, args.world_size)
            n = input.size(0)
            losses_m.update(loss.item(), n)
            top1_m.update(acc1.item(), n)
            top5_m.update(acc5.item(), n)
            num_images += n * args.world_size
    elapsed = time.time() - t_start
    metrics = OrderedDict([
        ('loss', losses_m.avg),
        ('top1', top1_m.avg),
        ('top5', top5_m.avg),
        ('img_per_sec', num_images / max(elapsed, 1e-9)),
        ('model_img_per_sec', num_images / max(forward_time, 1e-9)),  # forward passes alone
    ])
    _logger.info(f'Eval{log_suffix}: loss {metrics["loss"]:.4f}  top-1 {metrics["top1"]:.3f}  '
                 f'top-5 {metrics["top5"]:.3f}  ({num_images} images, {metrics["img_per_sec"]:.1f} img/s)')
    return metrics


def _filter_fn_for(model: nn.Module):
    """The `checkpoint_filter_fn` of the model's timm module (pos-embed resizing, dense -> MASA conversion, ...)."""
    module = importlib.import_module(type(unwrap_model(model)).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def _load_initial_weights(model: nn.Module, checkpoint: Dict[str, Any], path: str, use_ema: bool = True) -> None:
    """Fine-tuning start: weights from `checkpoint` through the model's filter; a head of another size is replaced."""
    state_dict = checkpoint_state_dict(checkpoint, use_ema=use_ema)
    filter_fn = _filter_fn_for(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    dropped = [k for k in ('head.weight', 'head.bias') if k in state_dict and k in own
               and state_dict[k].shape != own[k].shape]
    for k in dropped:
        del state_dict[k]
    incompatible = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in incompatible.missing_keys if k not in dropped]
    if missing or incompatible.unexpected_keys:
        raise CheckpointError(
            f'{path} does not fit model {type(model).__name__}: missing {missing[:8]}, unexpected '
            f'{incompatible.unexpected_keys[:8]} (a different architecture or MASA layout?).')
    if dropped:
        _logger.info(f'Initialized from {path} with a new {own["head.weight"].shape[0]}-class head '
                     f'(the checkpoint\'s head has {checkpoint_model_info(checkpoint)["num_classes"]} classes).')
    else:
        _logger.info(f'Initialized model weights from {path}.')


def _resolve_output_dir(args, data_config) -> str:
    if args.output:
        return os.path.join(args.output, args.experiment) if args.experiment else args.output
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    return os.path.join('output', 'train', exp_name)


def _gather_rng_states(args) -> List[Dict[str, Any]]:
    """RNG states of every process (a collective call in distributed runs)."""
    state = get_rng_state()
    if not args.distributed:
        return [state]
    states = [None] * args.world_size
    dist.all_gather_object(states, state)
    return states


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or with --eval-only, evaluate) as the flags and --config say; returns the final metrics.

    Bad input (config, data, checkpoint, class count, a non-finite loss) ends the run with SystemExit and one clear
    message; the checkpoints already written stay as they are.
    """
    _setup_logging()
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    try:
        result = _main(argv)
    except (TrainError, DataError, CheckpointError, BadImageError) as e:
        _logger.error(str(e))
        raise SystemExit(f'error: {e}') from e
    # A process that exits with its gloo/NCCL group alive can abort in the group's destructor at interpreter exit
    # ("terminate called without an active exception", SIGABRT) after a run that went well. Only on success: after a
    # rank-local error the peers may still sit in a collective, and torchrun ends them.
    if owns_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _logger.info('Distributed process group closed.')
    return result


def validate_main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """`masa-validate`: `main` with --eval-only (same flags and configs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(['--eval-only'] + argv)


def _main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args, config = _parse_args(argv)

    if not args.device:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    primary = args.rank == 0
    if not primary:
        _logger.setLevel(logging.WARNING)
    if args.distributed:
        _logger.info(f'Training in distributed mode with {args.world_size} processes ({dist.get_backend()}).')
    if args.threads:
        torch.set_num_threads(args.threads)
    args.prefetcher = not args.no_prefetcher and device.type == 'cuda'
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    args.progress = args.progress and primary

    use_amp = args.amp and device.type == 'cuda'
    if args.amp and not use_amp:
        _logger.warning(f'--amp is for CUDA only: training in float32 on {device.type}.')
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if use_amp else suppress
    loss_scaler = torch.amp.GradScaler('cuda') if use_amp and amp_dtype == torch.float16 else None

    random_seed(args.seed, args.rank)

    # -- the checkpoint to start from: its model options win over the config's (restored, not guessed)
    if args.resume and args.initial_checkpoint:
        raise TrainError('give either --resume (continue a run) or --initial-checkpoint (start a new run from its '
                         'weights), not both.')
    source = args.resume or args.initial_checkpoint
    checkpoint = load_checkpoint_file(source) if source else None
    info = checkpoint_model_info(checkpoint) if checkpoint is not None else {}
    if args.eval_only and not (source or args.pretrained):
        raise TrainError('--eval-only needs weights: --resume CKPT, --initial-checkpoint CKPT or --pretrained.')
    if info.get('arch') and safe_model_name(info['arch']) != safe_model_name(args.model):
        raise TrainError(f"{source} holds a '{info['arch']}' model but --model is '{args.model}'.")

    # -- data (before the model: the number of classes comes from the dataset)
    dataset_kwargs = dict(
        root=args.data_dir, class_map=args.class_map, download=args.dataset_download, seed=args.seed,
        bad_images=args.bad_images)
    dataset_train = None
    if not args.eval_only:
        dataset_train = create_dataset(
            args.dataset, split=args.train_split, is_training=True, batch_size=args.batch_size, **dataset_kwargs)
    dataset_eval = create_dataset(
        args.dataset, split=args.val_split, is_training=False, batch_size=args.validation_batch_size or
        args.batch_size, **dataset_kwargs)
    data_classes = dataset_classes(dataset_train if dataset_train is not None else dataset_eval)
    num_classes = args.num_classes or data_classes or info.get('num_classes')
    if num_classes is None:
        raise TrainError(f'cannot tell the number of classes of dataset {args.dataset!r}: pass --num-classes.')
    if data_classes is not None and num_classes != data_classes:
        raise TrainError(f'--num-classes {num_classes} does not match the {data_classes} classes of the dataset.')
    ckpt_classes = info.get('num_classes')
    if ckpt_classes is not None and ckpt_classes != num_classes and (args.resume or args.eval_only):
        raise TrainError(
            f'{source} has a {ckpt_classes}-class head but the dataset has {num_classes} classes. To fine-tune it on '
            f'this dataset with a new head, start from it with --initial-checkpoint instead of --resume.')

    # -- model
    model_kwargs = dict(args.model_kwargs or {})
    masa_kwargs = info.get('masa_kwargs')
    if masa_kwargs:
        for key, value in masa_kwargs.items():
            if key in model_kwargs and model_kwargs[key] != value:
                _logger.warning(f'model_kwargs sets {key}={model_kwargs[key]!r} but {source} was trained with '
                                f'{key}={value!r}: using the checkpoint\'s.')
        model_kwargs.update(masa_kwargs)
    # flags given a value win over the same option in model_kwargs
    for key, value in (('drop_rate', args.drop), ('drop_path_rate', args.drop_path), ('global_pool', args.gp)):
        if value is not None:
            model_kwargs[key] = value
    try:
        model = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f'cannot build model {args.model!r} with {model_kwargs}: {e}') from e
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if checkpoint is not None:
        if args.resume or args.eval_only and not args.initial_checkpoint:
            state_dict = checkpoint_state_dict(checkpoint, use_ema=args.eval_only and args.eval_ema)
            try:
                model.load_state_dict(state_dict)
            except RuntimeError as e:
                raise CheckpointError(f'{source} does not fit model {args.model} {model_kwargs}: {e}') from e
        else:
            _load_initial_weights(model, checkpoint, source, use_ema=not args.eval_only or args.eval_ema)
    counts = param_counts(model)
    _logger.info(f'Model {safe_model_name(args.model)} created: {counts["total"]:,} parameters, attention '
                 f'{counts["attention"]:,} of {counts["attention_dense"]:,} dense '
                 f'({100 * counts["attention_compression"]:.1f}% compression); '
                 f'MASA options {getattr(model, "masa_kwargs", {})}')

    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model_img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if args.img_size is None and args.input_size is None and model_img_size is not None:
        data_config['input_size'] = (data_config['input_size'][0], *model_img_size)  # the size it was built for
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    loader_eval = create_loader(
        dataset_eval, is_training=False, input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, world_size=args.world_size,
        rank=args.rank, seed=args.seed, crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device,
        use_prefetcher=args.prefetcher)
    validate_loss_fn = nn.CrossEntropyLoss().to(device)

    if args.eval_only:
        return _evaluate_only(args, model, loader_eval, validate_loss_fn, device, amp_autocast, source, counts,
                              num_images=len(dataset_eval))

    metric_names = ['loss', 'top1', 'top5']
    metric_names += [f'ema_{m}' for m in metric_names] if args.model_ema else []
    if args.eval_metric not in metric_names:
        raise TrainError(f'--eval-metric {args.eval_metric} is none of {metric_names}.')

    # -- optimizer, scaler, schedule (timm)
    if args.lr is None:
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        _logger.info(f'Learning rate ({args.lr:.3g}) from base learning rate ({args.lr_base}) and effective '
                     f'global batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))

    # -- augmentation, loaders
    collate_fn = None
    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    loader_train = create_loader(
        dataset_train, is_training=True, input_size=data_config['input_size'], batch_size=args.batch_size,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        interpolation=train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, world_size=args.world_size, rank=args.rank, seed=args.seed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
        persistent_workers=args.persistent_workers, worker_seeding=args.worker_seeding)
    if len(loader_train) == 0:
        raise TrainError(f'{len(dataset_train)} training images are fewer than one batch of {args.batch_size} per '
                         f'process: lower --batch-size.')

    if mixup_active:
        train_loss_fn = BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss \
            else SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh) \
            if args.bce_loss else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    decreasing_metric = 'loss' in args.eval_metric
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=updates_per_epoch)

    # -- resume: model, optimizer, scaler, scheduler, EMA, epoch and batch, RNG states
    start_epoch, start_batch = 0, 0
    if args.resume:
        if not args.no_resume_opt:
            optimizer.load_state_dict(checkpoint['optimizer'])
            if loss_scaler is not None and 'amp_scaler' in checkpoint:
                loss_scaler.load_state_dict(checkpoint['amp_scaler'])
            # timm schedules are functions of the config: rebuilt from the flags, as in timm; say so if it changed
            if checkpoint.get('scheduler') is not None and checkpoint['scheduler'] != lr_scheduler.state_dict():
                changed = sorted(k for k, v in lr_scheduler.state_dict().items() if checkpoint['scheduler'].get(k) != v)
                _logger.warning(f'The learning rate schedule differs from the checkpoint\'s ({", ".join(changed)}): '
                                f'following the flags given now.')
        if 'resume_epoch' in checkpoint:
            start_epoch, start_batch = int(checkpoint['resume_epoch']), int(checkpoint.get('resume_batch', 0))
        elif 'epoch' in checkpoint:
            start_epoch = int(checkpoint['epoch']) + 1  # timm checkpoints hold the last completed epoch
        _logger.info(f'Resuming {source} at epoch {start_epoch}' + (f', batch {start_batch}' if start_batch else ''))
    if args.start_epoch is not None:
        start_epoch, start_batch = args.start_epoch, 0
    if start_epoch or start_batch:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch + start_batch // args.grad_accum_steps)
        else:
            lr_scheduler.step(start_epoch)

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)
        if args.resume and checkpoint.get('state_dict_ema') is not None:
            model_ema.module.load_state_dict(checkpoint_state_dict(checkpoint, use_ema=True))

    if args.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=not args.no_ddp_bb)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)

    # -- outputs, on the primary process only
    output_dir = saver = writer = None
    if primary:
        output_dir = _resolve_output_dir(args, data_config)
        if not args.resume and os.path.exists(os.path.join(output_dir, 'last.pth.tar')):
            raise TrainError(f'{output_dir} already holds a run (last.pth.tar): continue it with --resume '
                             f'{os.path.join(output_dir, "last.pth.tar")}, or choose another --output.')
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(config, f, default_flow_style=False, sort_keys=False)
        saver = CheckpointSaver(
            model=model, optimizer=optimizer, model_ema=model_ema, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=decreasing_metric, max_history=args.checkpoint_hist, config=config)
        if args.resume and checkpoint.get('saver') and \
                os.path.abspath(os.path.dirname(source)) == os.path.abspath(output_dir):
            saver.load_state_dict(checkpoint['saver'])
        summary_path = os.path.join(output_dir, 'summary.csv')
        if os.path.exists(summary_path):
            trim_summary(summary_path, start_epoch)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=output_dir)
            log_param_counts(writer, model, step=start_epoch * updates_per_epoch)
            writer.add_text('config', '```\n' + yaml.safe_dump(config, sort_keys=False) + '\n```', 0)
            if start_epoch == 0 and not start_batch and args.coef_log_interval:
                log_coefficients(writer, model, step=0, epoch=0)
        _logger.info(f'Output folder: {output_dir}')
    _logger.info(f'Scheduled epochs: {num_epochs}, {updates_per_epoch} optimizer steps per epoch.')

    rng_states = checkpoint.get('rng_state') if args.resume else None
    if rng_states is not None and len(rng_states) != args.world_size:
        _logger.warning(f'{source} holds RNG states of {len(rng_states)} processes, this run has '
                        f'{args.world_size}: the resumed run continues, but not bit-identical to an uninterrupted one.')
        rng_states = None

    def save_state(epoch: int, resume_epoch: int, resume_batch: int, num_updates: int, metric=None) -> str:
        """Write a checkpoint (collective: every process brings its RNG state); returns its path."""
        states = _gather_rng_states(args)
        if saver is None:
            return ''
        saver.extra_state = dict(
            scheduler=lr_scheduler.state_dict(),
            rng_state=states,
            resume_epoch=resume_epoch,
            resume_batch=resume_batch,
            num_updates=num_updates,
            masa_kwargs=dict(getattr(unwrap_model(model), 'masa_kwargs', {})),
            model_kwargs=model_kwargs,
            num_classes=num_classes,
        )
        if loss_scaler is not None:
            saver.extra_state['amp_scaler'] = loss_scaler.state_dict()
        if resume_batch:
            saver.save_recovery(epoch, batch_idx=resume_batch)
            return saver.curr_recovery_file
        saver.save_checkpoint(epoch, metric=metric)
        return os.path.join(output_dir, 'last.pth.tar')

    eval_metrics: Dict[str, float] = {}
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver is not None else (None, None)
    stop = _StopRequest()
    try:
        with stop:
            for epoch in range(start_epoch, num_epochs):
                batch0 = start_batch if epoch == start_epoch else 0
                set_loader_epoch(loader_train, epoch, start_batch=batch0)
                if rng_states is not None:
                    set_rng_state(rng_states[args.rank])  # exactly where the interrupted run was
                    rng_states = None
                train_metrics = train_one_epoch(
                    epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
                    model_ema=model_ema, mixup_fn=mixup_fn, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                    updates_per_epoch=updates_per_epoch, start_batch=batch0, stop=stop, writer=writer)
                if stop.stopped_at is not None:
                    at = stop.stopped_at
                    path = save_state(epoch, epoch, at['batch'], at['num_updates'])
                    _logger.warning(f'Stopped by {stop.signal_name} at epoch {epoch}, batch {at["batch"]}. Resumable '
                                    f'checkpoint: {path}. Continue with --resume {path}')
                    return OrderedDict(interrupted=True, checkpoint=path, **at)

                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = validate(model, loader_eval, validate_loss_fn, args, device, amp_autocast)
                if model_ema is not None:
                    ema_metrics = validate(model_ema, loader_eval, validate_loss_fn, args, device, amp_autocast,
                                           log_suffix=' (EMA)')
                    eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())

                num_updates = (epoch + 1) * updates_per_epoch
                if writer is not None:
                    for key, value in eval_metrics.items():
                        name = f'val_ema/{key[4:]}' if key.startswith('ema_') else f'val/{key}'
                        writer.add_scalar(name, value, num_updates)
                    writer.add_scalar('train/epoch_loss', train_metrics['loss'], num_updates)
                    writer.add_scalar('epoch', epoch, num_updates)
                    if args.coef_log_interval and (epoch + 1) % args.coef_log_interval == 0:
                        log_coefficients(writer, model, step=num_updates, epoch=epoch + 1)
                    writer.flush()
                if output_dir is not None:
                    lr = max(pg['lr'] for pg in optimizer.param_groups)
                    update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir,
                                   'summary.csv'), lr=lr)
                save_state(epoch, epoch + 1, 0, num_updates, metric=eval_metrics[args.eval_metric])
                if saver is not None:
                    best_metric, best_epoch = saver.best_metric, saver.best_epoch
                lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
                _, stop_requested = _sync_flags(torch.zeros((), device=device), stop, args)
                if stop_requested and epoch + 1 < num_epochs:
                    _logger.warning(f'Stopped by {stop.signal_name} after epoch {epoch}. Continue with --resume '
                                    f'{os.path.join(output_dir or "OUTPUT", "last.pth.tar")}')
                    return OrderedDict(interrupted=True, epoch=epoch + 1, batch=0)
    finally:
        if writer is not None:
            writer.close()

    if best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    result = OrderedDict(interrupted=False, best_metric=best_metric, best_epoch=best_epoch, output=output_dir)
    result.update(eval_metrics)
    return result


def _evaluate_only(args, model, loader, loss_fn, device, amp_autocast, source, counts, num_images):
    metrics = validate(model, loader, loss_fn, args, device, amp_autocast)
    result = OrderedDict(
        model=args.model,
        checkpoint=source or (f'timm pretrained {args.model}' if args.pretrained else ''),
        weights='ema' if args.eval_ema else 'model',
        dataset=args.dataset or args.data_dir,
        split=args.val_split,
        num_images=num_images,
        top1=metrics['top1'],
        top5=metrics['top5'],
        loss=metrics['loss'],
        param_count=counts['total'],
        attention_params=counts['attention'],
        attention_params_dense=counts['attention_dense'],
        attention_compression=counts['attention_compression'],
        img_per_sec=metrics['img_per_sec'],
        model_img_per_sec=metrics['model_img_per_sec'],
        batch_size=args.validation_batch_size or args.batch_size,
        device=str(device),
        masa_kwargs=dict(getattr(model, 'masa_kwargs', {})),
    )
    if args.rank == 0:
        output_dir = args.output or (os.path.dirname(os.path.abspath(source)) if source else os.path.join(
            'output', 'eval'))
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, 'eval_results.json')
        with open(path, 'w') as f:
            json.dump(result, f, indent=2)
        _logger.info(f'Wrote {path}')
        print(json.dumps(result))  # the CLI's result line
    return result


if __name__ == '__main__':
    main()
