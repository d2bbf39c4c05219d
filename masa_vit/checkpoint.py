""" Checkpoint files: atomic writes, safe loads, and the state a bit-exact resume needs

* `save_atomic` writes `path.tmp`, fsyncs it and renames it over `path` (`os.replace` is atomic), so a run killed at
  any moment leaves either the previous file or the new one, never a truncated one.
* `load_checkpoint_file` reads `.safetensors` or torch files with `torch.load(weights_only=True)` only: a file that
  would need arbitrary pickled code is refused with `UnsafeCheckpointError` naming the offending globals, and nothing
  in it is executed.
* `CheckpointSaver` is timm's saver (last / best / ranked history, bookkeeping restored on resume) writing through
  `save_atomic` and adding what timm's does not store: scheduler, RNG states of every rank, MASA options, config and
  the resume point (epoch and batch, for checkpoints written mid-epoch on SIGTERM / SIGINT).
"""
import argparse
import json
import logging
import os
import pickle
import random
import shutil
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch
from timm.models import clean_state_dict
from timm.utils import CheckpointSaver as TimmCheckpointSaver
from timm.utils import get_state_dict

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'CheckpointSaver', 'save_atomic', 'load_checkpoint_file',
    'checkpoint_state_dict', 'checkpoint_model_info', 'get_rng_state', 'set_rng_state',
]

_logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not matching the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that needs arbitrary pickled code to load; refused, never executed."""


def save_atomic(obj: Any, path: str) -> None:
    """`torch.save` to `path` atomically: write `path.tmp`, fsync, `os.replace`."""
    tmp_path = path + '.tmp'
    with open(tmp_path, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    try:  # make the rename itself durable
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic


def _unsafe_globals(path: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (AttributeError, RuntimeError, OSError, pickle.UnpicklingError, zipfile.BadZipFile):
        return ''
    return ', '.join(names)


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint safely onto the CPU.

    `.safetensors` files give `{'state_dict': tensors, 'metadata': header metadata}`; torch files are loaded with
    `weights_only=True` (plain data and tensors; `argparse.Namespace` is allowed for timm training checkpoints).

    Raises:
        CheckpointError: the file is missing, truncated or not a checkpoint.
        UnsafeCheckpointError: loading would run arbitrary pickled code.
    """
    if not path or not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} not found.')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(path, framework='pt') as f:
                metadata = f.metadata() or {}
            return {'state_dict': load_file(path, device='cpu'), 'metadata': metadata}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): {e}') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e) and 'Unsupported global' not in str(e):
            raise CheckpointError(f'{path} is not a readable checkpoint (truncated or corrupt?): {e}') from e
        names = _unsafe_globals(path)
        raise UnsafeCheckpointError(
            f"refused to load {path}: it needs arbitrary pickled code to load"
            f"{' (' + names + ')' if names else ''}, and checkpoints are only loaded as tensors and plain data "
            f"(torch.load weights_only=True or .safetensors); nothing in it was run. If you trust where the file "
            f"comes from, re-save its state dict as plain tensors (e.g. with safetensors) and load that.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated or corrupt?): {e}') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or training checkpoint.')
    return checkpoint


def checkpoint_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint (the EMA weights with `use_ema` when it has them)."""
    for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return clean_state_dict(checkpoint)  # a bare state dict
    raise CheckpointError(f'no model state dict in checkpoint (keys: {sorted(checkpoint)[:10]}).')


def checkpoint_model_info(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint says about its model: arch, MASA options and number of classes (None where unknown).

    MASA options come from the `masa_kwargs` entry of a training checkpoint or the `masa_kwargs` JSON entry of a
    `.safetensors` header.
    """
    metadata = checkpoint.get('metadata') or {}
    masa_kwargs = checkpoint.get('masa_kwargs')
    if masa_kwargs is None and 'masa_kwargs' in metadata:
        masa_kwargs = json.loads(metadata['masa_kwargs'])
    arch = checkpoint.get('arch') or metadata.get('arch')
    state_dict = checkpoint_state_dict(checkpoint)
    head = state_dict.get('head.weight')
    return dict(
        arch=arch,
        masa_kwargs=dict(masa_kwargs) if masa_kwargs else None,
        num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else None,
    )


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain data and tensors (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        'python': (version, list(keys), gauss),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    version, keys, gauss = state['python']
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class CheckpointSaver(TimmCheckpointSaver):
    """timm's `CheckpointSaver` writing atomically and storing the complete training state.

    Set `extra_state` (a dict: scheduler, rng_state, masa_kwargs, resume point, ...) before each save; `config` is
    the resolved configuration (plain data) stored as `args`.
    """

    def __init__(self, *args, config: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.extra_state: Dict[str, Any] = {}

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state = {
            'epoch': epoch,
            'arch': self.config.get('model') if self.config else type(self.model).__name__.lower(),
            'version': 2,  # epoch is the last completed one
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'args': self.config,
            'saver': self.state_dict(epoch, metric),
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state.update(self.extra_state)
        save_atomic(state, save_path)

    def _duplicate(self, src: str, dst: str) -> None:
        # hard link where possible (atomic: dst is removed first, then linked); otherwise copy to a temporary file
        # and rename it, never leaving a partial copy under dst
        if self.can_hardlink:
            try:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.link(src, dst)
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        shutil.copy2(src, dst + '.tmp')
        os.replace(dst + '.tmp', dst)
