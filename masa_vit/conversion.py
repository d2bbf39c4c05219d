""" Training-free conversion of a pretrained timm ViT into a MASA ViT.

`Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning`
    - https://arxiv.org/abs/2508.04581 (Zhussip, Shopkhoev, Ali, Lefkimmiatis, AAAI 2026), "Pretrained models"

The paper's training-free path (shown there on LLMs), brought to timm's `VisionTransformer`:

1. Calibration (optional): images run through the dense model; per block the input autocorrelation X^T X of the
   `qkv` and `proj` linears, and each block's token state mapped through the model's own final norm and head to a
   class distribution.
2. Grouping: an int or explicit group starts, or 'auto': cut the stack where the KL divergence between consecutive
   blocks' class distributions is largest.
3. Matrix PCA per projection kind per group (`matrix_pca.matrix_pca`, closed form through the L x L Gram matrix).
4. Local refinement: the residual W - W^ of every shared projection, whitened with the Cholesky factor of the
   layer's X^T X, is approximated at low rank and kept as the block's low-rank term (`AtomLinear.lowrank`). One rank
   per role (Q/K/V/O) for all blocks, allocated greedily by whitened residual energy under the attention budget.
5. Joint refinement (beyond the paper): atoms, coefficients and low-rank terms optimized together on the whitened
   output objective (`matrix_pca.joint_refine`, L-BFGS or block coordinate descent), the atom count chosen on the
   refined models (by the KL of the logits on the calibration images, or by the objective).
6. Sequential calibration (optional, `sequential_refit`): block by block in order, each block's coefficients and
   low-rank terms refitted on the converted model's own inputs towards the dense outputs
   (`matrix_pca.error_correcting_target`).
7. A report: per block and projection the relative reconstruction error (weights, and outputs on calibration data),
   parameters before/after, and top-1 / agreement / KL of dense vs converted on calibration or held-out images.

`convert_state_dict` is the pure, data-free part (dense state dict in, MASA state dict out); the model's
`checkpoint_filter_fn` calls it so that `timm.create_model('masa_vit_*', pretrained=True)` converts while loading.
`svd_from_dense` builds the same-budget per-layer truncated SVD / whitened SVD (SVD-LLM) baselines.
"""
import copy
import functools
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerScale
from timm.models import VisionTransformer

from .attention import AtomLinear
from .masa_vision_transformer import (
    MasaVisionTransformer, SharedWeightBlocks, count_params, parse_share, resolve_groups,
)
from .matrix_pca import (
    allocate_ranks, cholesky_factor, error_correcting_target, joint_refine, kl_group_starts, layer_kl_drift,
    matrix_pca, matrix_pca_common, matrix_pca_spectrum, refit_coef_lowrank, truncated_svd, whitened_lowrank,
)

__all__ = [
    'from_dense', 'svd_from_dense', 'sequential_refit', 'convert_state_dict', 'collect_calibration',
    'CalibrationStats',
    'vit_kwargs_from_dense', 'evaluate_agreement', 'predict_logits', 'report_to_markdown', 'save_converted', 'load_converted',
]

_logger = logging.getLogger(__name__)

KINDS = ('q', 'k', 'v', 'o')
_LAYER_PARTS = (('qkv', ('q', 'k', 'v')), ('proj', ('o',)))


# ---------------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return getattr(model, 'module', model)  # DDP


def _check_dense_vit(model: nn.Module) -> VisionTransformer:
    model = _unwrap(model)
    if isinstance(model, MasaVisionTransformer) and model.sharing != 'dense':
        raise TypeError('from_dense expects a dense timm VisionTransformer; this model already shares attention '
                        f"(sharing={model.sharing!r}). Use masa_vit.to_dense(model) first to re-convert it.")
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f'from_dense expects a timm VisionTransformer (e.g. timm.create_model("vit_base_patch16_224")), '
            f'got {type(model).__name__}, which is not a ViT.')
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, 'attn', None)
        if not (isinstance(getattr(attn, 'qkv', None), nn.Linear) and isinstance(getattr(attn, 'proj', None), nn.Linear)):
            raise TypeError(
                f'block {i} of this {type(model).__name__} has no fused attn.qkv / attn.proj linear layers; '
                'only timm ViTs with standard Attention can be converted.')
    return model


def vit_kwargs_from_dense(model: nn.Module) -> Dict[str, Any]:
    """The `VisionTransformer` constructor arguments that rebuild `model`'s architecture (a timm ViT keeps none).

    `from_dense` checks the rebuilt model module by module against the original and refuses to convert when they
    differ, so a variant this inference does not know raises instead of converting silently wrong.
    """
    model = _check_dense_vit(model)
    if hasattr(model, '_vit_kwargs'):  # a MasaVisionTransformer(sharing='dense') knows its own arguments
        return dict(model._vit_kwargs)
    blk = model.blocks[0]
    pe = model.patch_embed
    norm = blk.norm1
    norm_layer = type(norm)
    eps = getattr(norm, 'eps', None)
    if eps is not None and eps != 1e-6:
        norm_layer = functools.partial(norm_layer, eps=eps)
    act = getattr(blk.mlp, 'act', None)
    act_layer = None
    if act is not None:
        act_layer = 'gelu_tanh' if isinstance(act, nn.GELU) and act.approximate == 'tanh' else type(act)
    hidden = blk.mlp.fc1.out_features if hasattr(blk.mlp, 'fc1') else None
    kwargs = dict(
        img_size=tuple(pe.img_size) if pe.img_size is not None else None,
        patch_size=tuple(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=blk.attn.num_heads,
        qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        scale_attn_norm=not isinstance(getattr(blk.attn, 'norm', nn.Identity()), nn.Identity),
        scale_mlp_norm=not isinstance(getattr(blk.mlp, 'norm', nn.Identity()), nn.Identity),
        proj_bias=blk.attn.proj.bias is not None,
        init_values=1e-5 if isinstance(blk.ls1, LayerScale) else None,
        class_token=model.cls_token is not None,
        pos_embed='learn' if model.pos_embed is not None else 'none',
        no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size,
        dynamic_img_pad=getattr(pe, 'dynamic_img_pad', False),
        embed_layer=type(pe),
        norm_layer=norm_layer,
        act_layer=act_layer,
        block_fn=type(blk),
        mlp_layer=type(blk.mlp),
    )
    if hidden is not None:
        kwargs['mlp_ratio'] = hidden / model.embed_dim
    if getattr(pe, 'norm', None) is not None and not isinstance(pe.norm, nn.Identity):
        kwargs['embed_norm_layer'] = type(pe.norm)
    return kwargs


def _build_masa(vit_kwargs: Mapping[str, Any], masa_kwargs: Mapping[str, Any], dtype=None) -> MasaVisionTransformer:
    # weights are all overwritten by the conversion; skip timm's init of the dense part
    model = MasaVisionTransformer(**dict(vit_kwargs, weight_init='skip'), **masa_kwargs)
    return model.to(dtype=dtype) if dtype is not None else model


def _check_same_architecture(dense: nn.Module, masa: nn.Module) -> None:
    """Raise when the rebuilt MASA model differs from the dense one anywhere but the attention projections."""
    masa_modules = dict(masa.named_modules())
    masa_state = masa.state_dict()
    problems = []
    for name, m in dense.named_modules():
        if '.attn.qkv' in name or '.attn.proj' in name or not name:
            continue
        other = masa_modules.get(name)
        if other is None:
            problems.append(f'{name}: missing')
        elif (type(other) is not type(m) and not (type(other) is SharedWeightBlocks and type(m) is nn.Sequential)
              or other.extra_repr() != m.extra_repr()):
            problems.append(f'{name}: {type(m).__name__}({m.extra_repr()}) vs {type(other).__name__}({other.extra_repr()})')
    for k, v in dense.state_dict().items():
        if '.attn.qkv.' in k or '.attn.proj.' in k:
            continue
        if k not in masa_state or masa_state[k].shape != v.shape:
            problems.append(f'{k}: {tuple(v.shape)} vs {tuple(masa_state[k].shape) if k in masa_state else "missing"}')
    if problems:
        raise ValueError(
            'cannot rebuild this ViT variant as a MASA model; the rebuilt model differs in '
            + '; '.join(problems[:5]) + (f' (+{len(problems) - 5} more)' if len(problems) > 5 else ''))


def _attention_kinds(share: str) -> Tuple[str, ...]:
    parsed = parse_share(share)
    kinds, share_mlp = parsed if len(parsed) == 2 and isinstance(parsed[1], bool) else (parsed, False)
    if share_mlp or not kinds:
        raise ValueError(f"share={share!r}: the training-free conversion with a budget shares attention projections "
                         "only; for a data-free conversion with MLP sharing load the dense checkpoint into "
                         "timm.create_model('masa_vit_...', share='qkvo+mlp', pretrained=True, "
                         "pretrained_cfg_overlay=dict(file=...))")
    return kinds


def _attention_layers(model: nn.Module) -> List[Tuple[int, str, str, nn.Module, Tuple[str, ...]]]:
    """(block index, state-dict name, layer name, module, part kinds) of every attention projection."""
    out = []
    for i, blk in enumerate(model.blocks):
        for lname, kinds in _LAYER_PARTS:
            out.append((i, f'blocks.{i}.attn.{lname}', lname, getattr(blk.attn, lname), kinds))
    return out


def _dense_attention_weights(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[Tuple[int, str], torch.Tensor]:
    """Per (block, kind) the dense (out, in) attention weight of a dense ViT state dict, float64."""
    weights = {}
    for i, name, _, _, kinds in _attention_layers(model):
        w = state_dict[f'{name}.weight']
        pf = w.shape[0] // len(kinds)
        for j, kind in enumerate(kinds):
            weights[(i, kind)] = w[j * pf:(j + 1) * pf].detach().to('cpu', torch.float64)
    return weights


def _atom_layers(model: nn.Module) -> List[Tuple[str, AtomLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AtomLinear)]


def _whitening(
        stats: Optional['CalibrationStats'], damping: float, bias_correction: bool,
        dense_state: Mapping[str, torch.Tensor], dense: nn.Module,
) -> Tuple[Optional[Dict[str, torch.Tensor]], Tuple[str, ...]]:
    """The Cholesky factors the conversion whitens with (None without data) and the layers it centers: with
    `bias_correction`, the attention layers whose dense version has a bias (the ones the correction can use)."""
    if bias_correction and stats is None:
        raise ValueError('bias_correction=True needs calibration data (calib= or stats=)')
    centered = tuple(name for _, name, _, _, _ in _attention_layers(dense)
                     if dense_state.get(f'{name}.bias') is not None) if bias_correction else ()
    return (stats.cholesky(damping, center=centered) if stats is not None else None), centered


@torch.no_grad()
def correct_biases(model: nn.Module, dense_state_dict: Mapping[str, torch.Tensor],
                   input_means: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Move the mean output error of every converted attention layer into its bias: b += (W - W^) mu.

    With mu the mean input row of the layer on the calibration data, the layer's outputs on that data then have the
    dense outputs' mean; together with a low-rank fit whitened by the *centered* input covariance
    (`CalibrationStats.cholesky(center=...)`) this is the optimal affine correction: min over W^ (of the given
    structure) and b' of ||W X^T + b 1^T - W^ X^T - b' 1^T||_F. Layers without a bias or a mean are left alone.
    Returns layer name -> ||(W - W^) mu|| (the shift applied).
    """
    model = _unwrap(model)
    shifts = {}
    for name, layer in _atom_layers(model):
        mu = input_means.get(name)
        if layer.bias is None or mu is None:
            continue
        w = dense_state_dict[f'{name}.weight'].to('cpu', torch.float64)
        w_hat = layer.composed_weight().detach().to('cpu', torch.float64)
        shift = (w - w_hat) @ mu.to(torch.float64)
        layer.bias.add_(shift.to(layer.bias))
        shifts[name] = float(shift.norm())
    return shifts


def _dense_part_weights(
        state_dict: Mapping[str, torch.Tensor], model: nn.Module,
) -> Dict[Tuple[str, str], torch.Tensor]:
    """Per (layer name, part) the dense (out, in) weight as float64 for every `AtomLinear` of `model`, shape-checked."""
    weights, problems = {}, []
    for name, layer in _atom_layers(model):
        key = f'{name}.weight'
        expected = (layer.out_features, layer.in_features)
        w = state_dict.get(key)
        if w is None:
            problems.append(f'{key} is missing')
            continue
        if tuple(w.shape) != expected:
            problems.append(f'{key} has shape {tuple(w.shape)}, the model needs {expected}')
            continue
        pf = layer.part_features
        for j, part in enumerate(layer.parts):
            weights[(name, part)] = w[j * pf:(j + 1) * pf].detach().to('cpu', torch.float64)
    if problems:
        raise ValueError(
            f'the checkpoint does not fit this model (depth {len(model.blocks)}, embed_dim {model.embed_dim}): '
            + '; '.join(problems[:4]) + (f' (+{len(problems) - 4} more)' if len(problems) > 4 else '')
            + '. Is it a checkpoint of a different ViT size?')
    return weights


def _fit_dictionaries(
        model: nn.Module, weights: Mapping[Tuple[str, str], torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[Tuple[str, str], torch.Tensor]]:
    """Matrix PCA (or, for 'select' dictionaries, per-set means) of every dictionary of `model`.

    Which dense weights a dictionary serves is read from the `AtomLinear` layers that use it (their `dictionary`,
    `block` and shared parts), so attention and MLP dictionaries, groups and common dictionaries are all handled
    alike. Returns the dictionaries' state entries and the composed (layer name, part) weights W^ in float64.
    """
    names = {id(m): name for name, m in model.named_modules()}
    users: Dict[int, Dict[Tuple[str, int], str]] = {}  # id(dictionary) -> (kind, block) -> layer name
    dicts: Dict[int, Any] = {}
    for name, layer in _atom_layers(model):
        for part, base in zip(layer.parts, layer.bases):
            if base == 'shared':
                d = layer.dictionary
                dicts[id(d)] = d
                users.setdefault(id(d), {})[(part, layer.block)] = name
    state, composed = {}, {}
    for key, d in dicts.items():
        prefix = names[key] + '.'
        use = users[key]
        missing = [(k, l) for k in d.kinds for l in range(d.num_blocks) if (k, l) not in use]
        if missing:
            raise ValueError(f'dictionary {names[key]} has kinds/blocks that no layer uses: {missing[:4]}')
        stacks = [torch.stack([weights[(use[(k, l)], k)] for l in range(d.num_blocks)]) for k in d.kinds]
        if d.num_atoms > d.num_blocks:
            raise ValueError(f'num_atoms={d.num_atoms} is larger than the group of {names[key]} ({d.num_blocks} blocks)')
        if d.coef_mode == 'mlp':
            raise ValueError("the training-free conversion fills coefficient matrices: build the model with "
                             "coef='direct' (an 'mlp' model can be folded with fold_coefficients() after fine-tuning).")
        if d.coef_mode == 'select':
            # sequential / cycle sharing: the best single matrix for a set of layers is their mean
            atoms = torch.zeros(d.num_kinds, d.num_atoms, *stacks[0].shape[1:], dtype=torch.float64)
            for s in range(d.num_atoms):
                members = [l for l in range(d.num_blocks) if d.assign[l] == s]
                for p, stack in enumerate(stacks):
                    atoms[p, s] = stack[members].mean(0)
            recs = [atoms[p, list(d.assign)] for p in range(d.num_kinds)]
            state[prefix + 'atoms'] = atoms
        else:
            if d.common:
                atoms, coef = matrix_pca_common(stacks, d.num_atoms)  # (S, o, i), (P, L, S)
                recs = [torch.einsum('ls,soi->loi', coef[p], atoms) for p in range(d.num_kinds)]
                atoms = atoms[None]
            else:
                fits = [matrix_pca(stack, d.num_atoms) for stack in stacks]
                atoms = torch.stack([at for at, _ in fits])  # (P, S, o, i)
                coef = torch.stack([c for _, c in fits])  # (P, L, S)
                recs = [torch.einsum('ls,soi->loi', coef[p], atoms[p]) for p in range(d.num_kinds)]
            state[prefix + 'atoms'] = atoms
            state[prefix + 'coef'] = coef
        for p, k in enumerate(d.kinds):
            for l in range(d.num_blocks):
                composed[(use[(k, l)], k)] = recs[p][l]
    return state, composed


def convert_state_dict(
        dense_state_dict: Mapping[str, torch.Tensor],
        masa_model: nn.Module,
        whitening: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Convert a dense timm ViT state dict into a state dict for `masa_model` (pure: inputs are not modified).

    Every entry that is not the weight of a shared layer passes through unchanged (so timm's loader can still drop
    or adapt the classifier). Each dictionary gets Matrix PCA atoms and coefficients of the weights it serves;
    unshared parts of a shared layer keep their dense rows; low-rank terms (refinement, or the 'low_rank' baseline)
    get the truncated SVD of the residual W - W^, data-aware when a Cholesky factor of the layer's input
    autocorrelation is given.

    Args:
        dense_state_dict: A dense `VisionTransformer` state dict (after timm's own checkpoint filter).
        masa_model: The target `MasaVisionTransformer`; only its structure is read.
        whitening: Optional layer name ('blocks.3.attn.qkv') -> lower Cholesky factor (in, in) of its inputs'
            X^T X; without it the low-rank terms are the plain truncated SVD of the residual.

    Returns:
        A new state dict that `masa_model.load_state_dict(..., strict=True)` accepts (given a matching head).
    """
    model = _unwrap(masa_model)
    weights = _dense_part_weights(dense_state_dict, model)
    layers = _atom_layers(model)
    replaced = {f'{name}.weight' for name, _ in layers}
    out = {k: v for k, v in dense_state_dict.items() if k not in replaced}
    dict_state, composed = _fit_dictionaries(model, weights)
    for name, layer in layers:
        dtype = dense_state_dict[f'{name}.weight'].dtype
        own = [weights[(name, p)] for p, base in zip(layer.parts, layer.bases) if base == 'own']
        if own:
            out[f'{name}.weight'] = torch.cat(own).to(dtype)
        chol = whitening.get(name) if whitening is not None else None
        for p, base in zip(layer.parts, layer.bases):
            rank = layer.lowrank_ranks.get(p)
            if not rank:
                continue
            target = weights[(name, p)]
            if base == 'shared':
                resid = target - composed[(name, p)]
            elif base == 'own':
                resid = torch.zeros_like(target)
            else:
                resid = target
            if not bool(resid.any()):
                u = torch.zeros(target.shape[0], rank, dtype=torch.float64)
                v = torch.zeros(rank, target.shape[1], dtype=torch.float64)
            elif chol is not None:
                u, v = whitened_lowrank(resid, None, rank, chol=chol)
            else:
                u, v = truncated_svd(resid, rank)
            out[f'{name}.lowrank.{p}_u'] = u.to(dtype)
            out[f'{name}.lowrank.{p}_v'] = v.to(dtype)
    if layers:
        dtype = dense_state_dict[f'{layers[0][0]}.weight'].dtype
        out.update({k: v.to(dtype) for k, v in dict_state.items()})
    return out


# ---------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------

@dataclass
class CalibrationStats:
    """What the conversion needs from calibration images, gathered in one pass of the dense model.

    Attributes:
        xtx: layer name ('blocks.3.attn.qkv', 'blocks.3.attn.proj') -> X^T X of its inputs, float64 (in, in).
        xsum: layer name -> the sum of its input rows, float64 (in,) (for centering and bias correction).
        block_logits: (L, N, C) logits of each block's token state through the model's final norm and head.
        logits: (N, C) the dense model's logits.
        targets: (N,) labels when the batches carried them, else None.
        num_images: N; num_tokens: rows summed into each X^T X.
    """
    xtx: Dict[str, torch.Tensor] = field(default_factory=dict)
    xsum: Dict[str, torch.Tensor] = field(default_factory=dict)
    block_logits: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    num_images: int = 0
    num_tokens: int = 0

    def cholesky(self, damping: float = 1e-2, center: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
        """Lower Cholesky factors of every X^T X (damped where needed, see `matrix_pca.cholesky_factor`); for the
        layers named in `center`, of the centered (X - 1 mu^T)^T (X - 1 mu^T) = X^T X - n mu mu^T instead."""
        center = set(center)
        missing = sorted(center - set(self.xsum))
        if missing:
            raise ValueError(f'no input sums for {missing[:3]}: collect the statistics with collect_calibration')
        return {k: cholesky_factor(v - torch.outer(self.xsum[k], self.xsum[k]) / self.num_tokens if k in center
                                   else v, damping) for k, v in self.xtx.items()}

    def input_means(self, names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        """Layer name -> mean input row mu (float64), for every layer or the ones in `names`."""
        names = self.xsum.keys() if names is None else names
        return {k: self.xsum[k] / self.num_tokens for k in names}


def _split_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], target
    if isinstance(batch, Mapping) and 'image' in batch:
        return batch['image'], batch.get('label')
    raise TypeError(f'calibration batches must be image tensors or (images, targets) pairs, got {type(batch).__name__}')


def _iter_batches(data: Iterable, max_batches: Optional[int] = None):
    if isinstance(data, torch.Tensor):
        data = [data]
    for n, batch in enumerate(data):
        if max_batches is not None and n >= max_batches:
            break
        yield _split_batch(batch)


@torch.no_grad()
def collect_calibration(
        model: nn.Module,
        calib: Iterable,
        max_batches: Optional[int] = None,
        block_logits: bool = True,
) -> CalibrationStats:
    """Run calibration images through a dense ViT and gather `CalibrationStats`.

    Args:
        model: A timm `VisionTransformer` (any with blocks[i].attn.qkv / .proj linears).
        calib: An iterable of image batches (a DataLoader or a list of tensors / (images, targets) pairs), or one
            tensor of images.
        max_batches: Use at most this many batches.
        block_logits: Also map every block's token state through the final norm and head (for KL grouping).
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stats = CalibrationStats()
    per_block: List[List[torch.Tensor]] = [[] for _ in model.blocks]
    logits, targets = [], []
    handles = []

    def add_xtx(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            acc = stats.xtx.get(name)
            stats.xtx[name] = x.T @ x if acc is None else acc + x.T @ x
            acc = stats.xsum.get(name)
            stats.xsum[name] = x.sum(0) if acc is None else acc + x.sum(0)
            if name.endswith('.0.attn.qkv'):
                stats.num_tokens += x.shape[0]
        return hook

    def block_out(i):
        def hook(module, args, output):
            per_block[i].append(model.forward_head(model.norm(output)).float().cpu())
        return hook

    try:
        for i, name, lname, layer, _ in _attention_layers(model):
            handles.append(layer.register_forward_pre_hook(add_xtx(name)))
        if block_logits:
            for i, blk in enumerate(model.blocks):
                handles.append(blk.register_forward_hook(block_out(i)))
        for x, y in _iter_batches(calib, max_batches):
            out = model(x.to(device=device, dtype=dtype))
            logits.append(out.float().cpu())
            if y is not None:
                targets.append(y.cpu())
            stats.num_images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if stats.num_images == 0:
        raise ValueError('the calibration data yielded no images')
    stats.xtx = {k: v.cpu() for k, v in stats.xtx.items()}
    stats.xsum = {k: v.cpu() for k, v in stats.xsum.items()}
    stats.logits = torch.cat(logits)
    if block_logits:
        stats.block_logits = torch.stack([torch.cat(b) for b in per_block])
    if targets and len(targets) == len(logits):
        stats.targets = torch.cat(targets)
    _logger.info('calibration: %d images, %d tokens per layer', stats.num_images, stats.num_tokens)
    return stats


@torch.no_grad()
def predict_logits(model: nn.Module, data: Iterable, max_batches: Optional[int] = None):
    """(logits (N, C) float32 CPU, targets (N,) or None) of `model` in eval mode over image batches."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    logits, targets = [], []
    try:
        for x, y in _iter_batches(data, max_batches):
            logits.append(model(x.to(device=p.device, dtype=p.dtype)).float().cpu())
            if y is not None:
                targets.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), (torch.cat(targets) if targets and len(targets) == len(logits) else None)


def _compare_logits(dense_logits: torch.Tensor, logits: torch.Tensor, targets: Optional[torch.Tensor]) -> Dict[str, Any]:
    logp_d = F.log_softmax(dense_logits.double(), -1)
    logp_m = F.log_softmax(logits.double(), -1)
    pred_d, pred_m = dense_logits.argmax(-1), logits.argmax(-1)
    out = dict(
        num_images=int(logits.shape[0]),
        agreement=float((pred_d == pred_m).double().mean()),
        mean_kl=float((logp_d.exp() * (logp_d - logp_m)).sum(-1).mean()),
    )
    if targets is not None:
        out['top1_dense'] = float((pred_d == targets).double().mean())
        out['top1'] = float((pred_m == targets).double().mean())
        out['top1_kept'] = out['top1'] / out['top1_dense'] if out['top1_dense'] > 0 else float('nan')
    return out


def evaluate_agreement(
        dense_model: nn.Module, model: nn.Module, data: Iterable, max_batches: Optional[int] = None,
        dense_logits: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Top-1 of both models (when the data has labels), top-1 agreement and mean KL(dense || model) of the logits."""
    logits, targets = predict_logits(model, data, max_batches)
    if dense_logits is None:
        dense_logits, _ = predict_logits(dense_model, data, max_batches)
    return _compare_logits(dense_logits, logits, targets)


class _StopForward(Exception):
    """Raised by a hook once the layer being calibrated has seen its input (the blocks after it are not needed)."""


@torch.no_grad()
def _layer_input_stats(
        dense: nn.Module, model: nn.Module, name: str, batches: Sequence[torch.Tensor], cross: bool,
        center: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], int, torch.Tensor, Optional[torch.Tensor]]:
    """Xc^T Xc of the input of layer `name` in `model` and, when `cross`, X^T Xc with X the same layer's input in
    `dense` on the same tokens (float64, CPU), the token count, and the mean input rows of Xc and (when `cross`) X.
    With `center`, the two products are of the centered inputs (Xc - 1 mu_c^T, X - 1 mu^T). Both forwards stop at
    the layer."""
    dense_layer = dense.get_submodule(name)
    layer = model.get_submodule(name)
    seen: Dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).to('cpu', torch.float64)
            raise _StopForward
        return hook

    xtx = xcross = xsum = dsum = None
    tokens = 0
    handles = [layer.register_forward_pre_hook(grab('c'))]
    if cross:
        handles.append(dense_layer.register_forward_pre_hook(grab('d')))
    p = next(model.parameters())
    try:
        for x in batches:
            x = x.to(device=p.device, dtype=p.dtype)
            for m in ((dense, model) if cross else (model,)):
                try:
                    m(x)
                except _StopForward:
                    pass
            xc = seen['c']
            xtx = xc.T @ xc if xtx is None else xtx + xc.T @ xc
            xsum = xc.sum(0) if xsum is None else xsum + xc.sum(0)
            if cross:
                a = seen['d'].T @ xc
                xcross = a if xcross is None else xcross + a
                dsum = seen['d'].sum(0) if dsum is None else dsum + seen['d'].sum(0)
            tokens += xc.shape[0]
    finally:
        for h in handles:
            h.remove()
    mean = xsum / tokens
    dmean = dsum / tokens if cross else None
    if center:
        xtx = xtx - tokens * torch.outer(mean, mean)
        if cross:
            xcross = xcross - tokens * torch.outer(dmean, mean)
    return xtx, xcross, tokens, mean, dmean


@torch.no_grad()
def _sequential_atom_rounds(
        dense: nn.Module, model: MasaVisionTransformer, calib: Sequence, dense_logits: torch.Tensor, rounds: int,
        bounds, kinds, common: bool, atoms_per_group, ranks, iters: int, method: str, target: str, sweeps: int,
        damping: float, bias_correction: bool = False,
) -> List[Dict[str, Any]]:
    """Refit the shared atoms on sequential statistics, guarded by the calibration KL (see `from_dense`)."""
    batches = [x for x, _ in _iter_batches(calib)]
    dense_state = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    dense_w = _dense_attention_weights(dense_state, dense)

    def calib_kl():
        return _compare_logits(dense_logits, predict_logits(model, calib)[0], None)['mean_kl']

    history = [dict(round=0, calib_kl=calib_kl())]
    model.eval()
    for r in range(1, rounds + 1):
        weights, chol = {}, {}
        for i, name, _, _, part_kinds in _attention_layers(model):
            center = bias_correction and dense_state.get(f'{name}.bias') is not None
            xtx, cross, _, _, _ = _layer_input_stats(dense, model, name, batches, target == 'dense', center)
            chol[name] = cholesky_factor(xtx, damping)
            for k in part_kinds:
                weights[(i, k)] = (error_correcting_target(dense_w[(i, k)], cross, chol[name]) if cross is not None
                                   else dense_w[(i, k)])
        joint = _joint_refine_groups(weights, bounds, kinds, common, atoms_per_group, ranks, chol, iters, method)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        state = dict(saved)
        _load_joint(state, model, joint, kinds)
        model.load_state_dict(state)
        sequential_refit(dense, model, calib, target=target, sweeps=sweeps, damping=damping,
                         bias_correction=bias_correction)
        kl = calib_kl()
        best = min(h['calib_kl'] for h in history)
        history.append(dict(round=r, calib_kl=kl, kept=kl < best))
        _logger.info('sequential atom round %d: calibration KL %.4g (before %.4g)', r, kl, best)
        if kl >= best:
            model.load_state_dict(saved)
            break
    return history


@torch.no_grad()
def sequential_refit(
        dense_model: nn.Module,
        model: MasaVisionTransformer,
        calib: Iterable,
        target: str = 'dense',
        sweeps: int = 10,
        damping: float = 1e-2,
        max_calib_batches: Optional[int] = None,
        bias_correction: bool = False,
) -> Dict[str, Any]:
    """Refit each block's low-rank terms (and its coefficients) on the converted model's own activations, in order.

    For block b = 0, 1, ...: the calibration images run through `model`, whose blocks < b are already refitted,
    up to block b's `attn.qkv`; its input statistics give the whitening of Q, K and V, whose coefficients (atoms
    fixed: they are shared by blocks before and after) and low-rank terms are refitted (`refit_coef_lowrank`); then
    the same for `attn.proj` with the refitted Q/K/V in place. Parts without a low-rank term are left as they are
    (with `bias_correction`, their layer's bias is still set).

    Args:
        dense_model: The dense ViT `model` was converted from (same layer names).
        model: A converted model (`from_dense` or `svd_from_dense`), modified in place.
        calib: Calibration images (as for `collect_calibration`).
        target: 'dense': fit the dense outputs W X from the converted inputs Xc (`error_correcting_target`, uses the
            cross-correlation X^T Xc); 'input': fit W on the converted inputs (whiten with Xc^T Xc, target W).
        sweeps: Coefficient / low-rank alternations per layer (`refit_coef_lowrank`).
        damping: Cholesky damping of Xc^T Xc when needed.
        bias_correction: The affine fit: refit on the centered inputs, then set each layer's bias so that its mean
            output on the calibration tokens is the target's: b' = b + W mu - W^ mu_c ('dense' target; mu, mu_c the
            mean dense and converted inputs) or b + (W - W^) mu_c ('input'). Layers without a bias are fitted as
            without it.

    Returns:
        Per layer the whitened objective relative to the target's whitened energy, before and after the refit.
    """
    if target not in ('dense', 'input'):
        raise ValueError(f"sequential target must be 'dense' or 'input', got {target!r}")
    dense = _unwrap(dense_model)
    model = _unwrap(model)
    batches = [x for x, _ in _iter_batches(calib, max_calib_batches)]
    if not batches:
        raise ValueError('sequential calibration needs calibration images')
    was_training = (dense.training, model.training)
    dense.eval()
    model.eval()
    dense_state = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    weights = _dense_attention_weights(dense_state, dense)
    rows = []
    try:
        for i, name, lname, layer, kinds in _attention_layers(model):
            refit = isinstance(layer, AtomLinear) and bool(layer.lowrank_ranks)
            dense_bias = dense_state.get(f'{name}.bias')
            # with bias_correction every layer with a bias gets the affine bias, refitted or not
            center = bias_correction and dense_bias is not None and getattr(layer, 'bias', None) is not None
            if not (refit or center):
                continue
            xtx, cross, tokens, mean_c, mean_d = _layer_input_stats(dense, model, name, batches, target == 'dense',
                                                                    center)
            chol = cholesky_factor(xtx, damping) if refit else None
            d = layer.dictionary if refit else None
            for p, base in zip(layer.parts, layer.bases) if refit else ():
                rank = layer.lowrank_ranks.get(p)
                if not rank or base == 'own':
                    continue
                w = weights[(i, p)]
                t = error_correcting_target(w, cross, chol) if cross is not None else w
                atoms = coef = None
                if base == 'shared':
                    if d.coef_mode != 'direct':
                        raise ValueError(f'sequential refit needs direct coefficients, {name} has {d.coef_mode!r}')
                    kidx = d.kinds.index(p)
                    atoms = d.atoms[0 if d.common else kidx].detach().cpu()
                    coef = d.coef[kidx, layer.block].detach().cpu()
                u_old = layer.lowrank[f'{p}_u'].detach().cpu().double()
                v_old = layer.lowrank[f'{p}_v'].detach().cpu().double()
                base_w = torch.einsum('s,soi->oi', coef.double(), atoms.double()) if atoms is not None else 0
                energy = max(float((t @ chol).square().sum()), 1e-300)
                before = float(((t - base_w - u_old @ v_old) @ chol).square().sum()) / energy
                c, u, v = refit_coef_lowrank(t, atoms, coef, chol, rank, sweeps=sweeps if atoms is not None else 0)
                base_w = torch.einsum('s,soi->oi', c, atoms.double()) if atoms is not None else 0
                after = float(((t - base_w - u @ v) @ chol).square().sum()) / energy
                if c is not None:
                    d.coef[kidx, layer.block].copy_(c.to(d.coef))
                layer.lowrank[f'{p}_u'].copy_(u.to(layer.lowrank[f'{p}_u']))
                layer.lowrank[f'{p}_v'].copy_(v.to(layer.lowrank[f'{p}_v']))
                rows.append(dict(block=i, proj=p, tokens=tokens, before=before, after=after))
            if center:
                w = dense_state[f'{name}.weight'].to(torch.float64)
                w_hat = (layer.composed_weight() if isinstance(layer, AtomLinear) else layer.weight).detach().to(
                    'cpu', torch.float64)
                mu = mean_d if mean_d is not None else mean_c
                layer.bias.copy_((dense_bias.to(torch.float64) + w @ mu - w_hat @ mean_c).to(layer.bias))
    finally:
        dense.train(was_training[0])
        model.train(was_training[1])
    _logger.info('sequential refit (%s target): %d layers, mean relative whitened error %.3g -> %.3g', target,
                 len(rows), sum(r['before'] for r in rows) / max(len(rows), 1),
                 sum(r['after'] for r in rows) / max(len(rows), 1))
    return dict(target=target, sweeps=sweeps, bias_correction=bias_correction, layers=rows)


# ---------------------------------------------------------------------------------------------------
# Budget planning
# ---------------------------------------------------------------------------------------------------

def _atom_cost(num_kinds: int, common: bool, num_atoms: int, group_len: int, d_out: int, d_in: int) -> int:
    atoms = (1 if common else num_kinds) * num_atoms * d_out * d_in
    return atoms + num_kinds * group_len * num_atoms


def _atom_configs(bounds: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Candidate atoms per group: the same fraction S/L in every group, S = 1..L of the largest group."""
    lmax = max(b - a for a, b in bounds)
    configs = []
    for s in range(1, lmax + 1):
        cfg = [min(b - a, max(1, round(s * (b - a) / lmax))) for a, b in bounds]
        if cfg not in configs:
            configs.append(cfg)
    return configs


def _residual_spectra(
        weights: Mapping[Tuple[int, str], torch.Tensor],
        bounds: Sequence[Tuple[int, int]],
        kinds: Sequence[str],
        common: bool,
        atoms_per_group: Sequence[int],
        chol: Optional[Mapping[str, torch.Tensor]],
) -> Dict[str, torch.Tensor]:
    """Per role the singular values (L, k) of each block's (whitened) Matrix PCA residual."""
    rows: Dict[str, List[torch.Tensor]] = {k: [] for k in kinds}
    for (a, b), s in zip(bounds, atoms_per_group):
        stacks = [torch.stack([weights[(l, k)] for l in range(a, b)]) for k in kinds]
        if common:
            atoms, coef = matrix_pca_common(stacks, s)
            recs = [torch.einsum('ls,soi->loi', coef[p], atoms) for p in range(len(kinds))]
        else:
            recs = []
            for k, stack in zip(kinds, stacks):
                atoms, coef = matrix_pca(stack, s)
                recs.append(torch.einsum('ls,soi->loi', coef, atoms))
        for k, stack, rec in zip(kinds, stacks, recs):
            for l in range(b - a):
                r = stack[l] - rec[l]
                c = chol.get(_layer_of(a + l, k)) if chol is not None else None
                if c is not None:
                    r = r @ c
                # float32 is plenty to rank candidates and is several times faster than float64 on CPU
                rows[k].append(torch.linalg.svdvals(r.float()).double())
    return {k: torch.stack(v) for k, v in rows.items()}


def _layer_of(block: int, kind: str) -> str:
    return f'blocks.{block}.attn.' + ('proj' if kind == 'o' else 'qkv')


def _whitened_energy(weights, kinds, depth, chol) -> Dict[str, float]:
    energy = {}
    for k in kinds:
        e = 0.0
        for l in range(depth):
            w = weights[(l, k)]
            c = chol.get(_layer_of(l, k)) if chol is not None else None
            e += float((w @ c).square().sum()) if c is not None else float(w.square().sum())
        energy[k] = e
    return energy


def _joint_refine_groups(
        weights: Mapping[Tuple[int, str], torch.Tensor],
        bounds: Sequence[Tuple[int, int]],
        kinds: Sequence[str],
        common: bool,
        atoms_per_group: Sequence[int],
        ranks: Mapping[str, int],
        chol: Optional[Mapping[str, torch.Tensor]],
        iters: int,
        method: str = 'lbfgs',
        tol: float = 0.0,
) -> Dict[str, Any]:
    """Matrix PCA + whitened low rank of every group, then `joint_refine` (block coordinate descent on atoms,
    coefficients and low-rank terms) of each dictionary: per kind, or all kinds at once for a common dictionary.

    Returns per group atoms (P or 1, S, o, i) and coef (P, L, S), the low-rank factors per (block, kind), the final
    whitened objective per kind and the objective history per dictionary (float64).
    """
    dim_in = weights[(0, kinds[0])].shape[1]
    eye = torch.eye(dim_in, dtype=torch.float64)

    def chol_of(block, kind):
        return chol[_layer_of(block, kind)] if chol is not None else eye

    out = dict(groups=[], lowrank={}, objective={k: 0.0 for k in kinds}, history=[])
    for g, ((a, b), s) in enumerate(zip(bounds, atoms_per_group)):
        stacks = [torch.stack([weights[(l, k)] for l in range(a, b)]) for k in kinds]
        blocks = list(range(a, b))
        if common:
            atoms, coef = matrix_pca_common(stacks, s)  # (S, o, i), (P, L, S)
            sets = [(list(kinds), torch.cat(stacks), atoms, coef.reshape(-1, s))]
        else:
            sets = [([k], stack, *matrix_pca(stack, s)) for k, stack in zip(kinds, stacks)]
        g_atoms, g_coef = [], []
        for set_kinds, w, atoms, coef in sets:
            items = [(l, k) for k in set_kinds for l in blocks]
            res = joint_refine(w, atoms, coef, [chol_of(l, k) for l, k in items], [ranks.get(k, 0) for _, k in items],
                               iters, tol=tol, method=method)
            g_atoms.append(res['atoms'])
            g_coef.append(res['coef'].reshape(len(set_kinds), len(blocks), s))
            for n, (l, k) in enumerate(items):
                out['objective'][k] += float(res['objective'][n])
                if res['u'][n] is not None:
                    out['lowrank'][(l, k)] = (res['u'][n], res['v'][n])
            out['history'].append(dict(group=g, proj=''.join(set_kinds), objective=res['history']))
        out['groups'].append(dict(atoms=torch.stack(g_atoms), coef=torch.cat(g_coef)))
    return out


def _plan(
        weights: Mapping[Tuple[int, str], torch.Tensor],
        bounds: Sequence[Tuple[int, int]],
        kinds: Sequence[str],
        common: bool,
        dim: int,
        fixed: int,
        budget: Optional[int],
        num_atoms: Optional[Sequence[int]],
        refine: bool,
        refine_rank: Optional[Union[int, Mapping[str, int]]],
        chol: Optional[Mapping[str, torch.Tensor]],
        rank_step: int,
        refine_iters: int = 0,
        refine_method: str = 'lbfgs',
        refine_candidates: Optional[int] = None,
        judge: Optional[Any] = None,
) -> Dict[str, Any]:
    """Choose atoms per group and refinement ranks per role for the attention parameter budget.

    With `refine_iters`, candidates are also jointly refined (ranks as allocated for their Matrix PCA residual), the
    fewest atoms first, until one refines worse than the best so far (at most `refine_candidates`), and compared
    on the refined objective, or on `judge(candidate, joint)` (lower is better, e.g. the converted model's KL on the
    calibration images) when given; the best one's refined weights are returned as 'joint'.
    """
    depth = bounds[-1][1]
    num_kinds = len(kinds)
    rank_cost = {k: depth * 2 * dim for k in kinds}

    def atoms_params(cfg):
        return sum(_atom_cost(num_kinds, common, s, b - a, dim, dim) for (a, b), s in zip(bounds, cfg))

    configs = [list(num_atoms)] if num_atoms is not None else _atom_configs(bounds)
    if budget is not None:
        feasible = [c for c in configs if fixed + atoms_params(c) <= budget]
        if not feasible:
            least = fixed + atoms_params(configs[0])
            raise ValueError(
                f'the attention budget ({budget} parameters) is too small: {configs[0]} atom(s) per group alone keep '
                f'{least} parameters. Ask for less compression, fewer groups or share fewer projections.')
    else:
        feasible = configs
    normalizer = _whitened_energy(weights, kinds, depth, chol) if refine else None
    candidates = []
    if not refine:
        best = max(feasible, key=atoms_params)
        return dict(num_atoms=best, refine_rank=None, candidates=candidates)
    if budget is None:
        if refine_rank is None:
            raise ValueError('refine=True without attn_compression needs refine_rank (an int or a dict per projection)')
        ranks = {k: refine_rank for k in kinds} if isinstance(refine_rank, int) else dict(refine_rank)
        return dict(num_atoms=feasible[0], refine_rank=ranks, candidates=candidates)
    best = None
    # reference: no atoms, the whole budget in per-block whitened low rank (what SVD-LLM does, with adaptive ranks)
    spectra0 = {k: torch.stack([torch.linalg.svdvals(
        (weights[(l, k)] @ chol[_layer_of(l, k)] if chol is not None else weights[(l, k)]).float()).double()
        for l in range(depth)]) for k in kinds}
    ranks0 = allocate_ranks(spectra0, budget - fixed, rank_cost, step=rank_step, normalize=normalizer)
    lowrank_only = dict(num_atoms=[0] * len(bounds), refine_rank=ranks0, score=sum(
        float(spectra0[k][:, ranks0[k]:].square().sum()) / normalizer[k] for k in kinds) / num_kinds)
    for cfg in feasible:
        spectra = _residual_spectra(weights, bounds, kinds, common, cfg, chol)
        left = budget - fixed - atoms_params(cfg)
        ranks = allocate_ranks(spectra, left, rank_cost, step=rank_step, normalize=normalizer)
        score = sum(float(spectra[k][:, ranks[k]:].square().sum()) / normalizer[k] for k in kinds)
        base = sum(float(spectra[k].square().sum()) / normalizer[k] for k in kinds)
        cand = dict(num_atoms=cfg, refine_rank=ranks, score=score / num_kinds, pca_only=base / num_kinds,
                    params=fixed + atoms_params(cfg) + sum(ranks[k] * rank_cost[k] for k in kinds))
        candidates.append(cand)
        _logger.debug('plan candidate %s', cand)
        if best is None or cand['score'] < best['score']:
            best = cand
    key, best_joint = 'score', None
    if refine_iters:
        key, best = 'refined_score', None
        # fewest atoms first, until a candidate refines worse than the best so far (or `refine_candidates` are done)
        for cand in candidates[:refine_candidates]:
            joint = _joint_refine_groups(weights, bounds, kinds, common, cand['num_atoms'], cand['refine_rank'],
                                         chol, refine_iters, refine_method)
            cand['refined_score'] = sum(joint['objective'][k] / normalizer[k] for k in kinds) / num_kinds
            _logger.info('plan: S=%s whitened energy left %.3g -> %.3g after joint refinement', cand['num_atoms'],
                         cand['score'], cand['refined_score'])
            if judge is not None:
                key = 'judged'
                cand[key] = float(judge(cand, joint))
                _logger.info('plan: S=%s judged %.4g', cand['num_atoms'], cand[key])
            if best is not None and cand[key] >= best[key]:
                break
            best, best_joint = cand, joint
    if lowrank_only['score'] < best['refined_score' if refine_iters else 'score']:
        _logger.warning(
            'the blocks share little: whitened low rank alone (no atoms) would leave %.3g of the whitened output '
            'energy, less than the best Matrix PCA + %s refinement (%.3g, S=%s); svd_from_dense gives that baseline',
            lowrank_only['score'], 'joint' if refine_iters else 'low-rank',
            best['refined_score' if refine_iters else 'score'], best['num_atoms'])
    return dict(num_atoms=best['num_atoms'], refine_rank=best['refine_rank'], candidates=candidates,
                lowrank_only=lowrank_only, joint=best_joint)


def _load_joint(state: Dict[str, torch.Tensor], model: MasaVisionTransformer, joint: Mapping[str, Any],
                kinds: Sequence[str]) -> None:
    """Write jointly refined atoms, coefficients and low-rank factors into a converted state dict (in place)."""
    for g, (d, fit) in enumerate(zip(model.dictionaries, joint['groups'])):
        if tuple(d.kinds) != tuple(kinds) or d.coef_mode != 'direct':
            raise ValueError(f'dictionary {g} serves {d.kinds} with coef={d.coef_mode!r}; joint refinement expects '
                             f'{tuple(kinds)} with direct coefficients')
        ref = state[f'dictionaries.{g}.atoms']
        state[f'dictionaries.{g}.atoms'] = fit['atoms'].to(ref.dtype)
        state[f'dictionaries.{g}.coef'] = fit['coef'].to(ref.dtype)
    for (block, kind), (u, v) in joint['lowrank'].items():
        key = f'{_layer_of(block, kind)}.lowrank.{kind}'
        state[key + '_u'] = u.to(state[key + '_u'].dtype)
        state[key + '_v'] = v.to(state[key + '_v'].dtype)


# ---------------------------------------------------------------------------------------------------
# from_dense
# ---------------------------------------------------------------------------------------------------

def from_dense(
        dense_model: nn.Module,
        attn_compression: Optional[float] = None,
        num_atoms: Optional[Union[int, Sequence[int]]] = None,
        groups: Union[int, str, Sequence[int]] = 1,
        calib: Optional[Iterable] = None,
        refine: Optional[bool] = None,
        refine_rank: Optional[Union[int, Mapping[str, int]]] = None,
        share: str = 'qkvo',
        dictionary: str = 'separate',
        auto_groups: int = 2,
        min_group_size: int = 2,
        max_calib_batches: Optional[int] = None,
        eval_data: Optional[Iterable] = None,
        max_eval_batches: Optional[int] = None,
        rank_step: int = 1,
        damping: float = 1e-2,
        stats: Optional[CalibrationStats] = None,
        refine_iters: Optional[int] = None,
        refine_method: str = 'lbfgs',
        refine_candidates: Optional[int] = None,
        select: Optional[str] = None,
        sequential: bool = False,
        sequential_target: str = 'dense',
        sequential_sweeps: int = 10,
        sequential_atom_rounds: int = 0,
        bias_correction: bool = False,
) -> MasaVisionTransformer:
    """Convert a pretrained dense timm ViT into a MASA ViT without training.

    The result has the dense model's shape, head and non-attention weights; its attention is Matrix PCA atoms and
    coefficients per group (plus per-block whitened low-rank refinement terms when `refine`). The conversion report
    (a dict, see `report_to_markdown`) is attached as `model.conversion_report`.

    Args:
        dense_model: A timm `VisionTransformer`.
        attn_compression: Target fraction of attention parameters removed (e.g. 0.2), counting everything attention
            keeps (atoms, coefficients, biases, refinement terms; `count_params`). The result never exceeds it.
        num_atoms: Atoms per group (int or one per group) instead of, or together with, `attn_compression`.
        groups: Number of contiguous groups, their start indices, or 'auto' (KL-drift cuts on calibration images
            into `auto_groups` groups of at least `min_group_size` blocks).
        calib: Calibration images: a DataLoader, a list of tensors or (images, targets) pairs, or one tensor.
        refine: Add whitened low-rank refinement terms. Default: when `calib` is given and either
            `attn_compression` or `refine_rank` is.
        refine_rank: Explicit refinement rank (int, or per projection) instead of the budget allocation.
        share: Projections to share ('qkvo', 'qkv', ...); the rest stay per block, unchanged.
        dictionary: 'separate' (one dictionary per projection) or 'common'.
        max_calib_batches: Use at most this many calibration batches.
        eval_data: Held-out (images, targets) batches for the report; default: the calibration data.
        rank_step: Rank granularity of the allocation.
        damping: Cholesky damping (times the mean diagonal) when X^T X is singular.
        stats: Precomputed `collect_calibration(dense_model, calib)` statistics, instead of `calib` (to convert one
            model several times); the report then evaluates on `eval_data` only.
        refine_iters: Iterations of joint refinement (atoms, coefficients and low-rank terms optimized together on
            the whitened output objective, `matrix_pca.joint_refine`) after Matrix PCA + whitened low rank; with a
            budget the plan then compares the atom counts on the refined models. Default 0: atoms and coefficients
            stay the Matrix PCA ones (the paper's construction); 300 gave the best digits results but costs hours for
            a ViT-B on a CPU. Needs refinement terms (`refine`).
        refine_method: 'lbfgs' (L-BFGS on atoms and coefficients, the low rank kept optimal; `refine_iters` counts
            L-BFGS iterations) or 'bcd' (block coordinate descent sweeps over low rank, coefficients and atoms).
        refine_candidates: The plan refines atom counts S = 1, 2, ... (each a full joint refinement) until one is
            worse than the best so far; this caps how many (None: no cap).
        select: How the plan compares jointly refined atom counts: 'objective' (the summed relative whitened output
            error of the layers, what the refinement minimizes) or 'calib_kl' (build each candidate and take the
            mean KL(dense || converted) of the logits on the calibration images; needs `calib` and `refine_iters`).
            The per-layer objective does not weigh how each layer's error reaches the logits. Default: 'calib_kl'
            when `calib`, a budget and joint refinement are given, else 'objective'.
        sequential: Sequential calibration after the conversion (`sequential_refit`): block by block in order, each
            block's coefficients and low-rank terms are refitted on the inputs that the converted model (blocks
            before it already refitted) gives its attention projections; atoms, atom counts and ranks stay as the
            plan chose them on the dense model's statistics. Needs `calib` images and refinement terms.
        sequential_target: 'dense' (fit the dense outputs from the converted inputs, through the cross-correlation)
            or 'input' (fit the dense weight on the converted inputs).
        sequential_sweeps: Coefficient / low-rank alternations per layer in the sequential refit.
        sequential_atom_rounds: After the sequential refit, up to this many rounds of: every layer's sequential
            statistics on the current model, joint refinement (`refine_iters`, `refine_method`) of atoms,
            coefficients and low rank on them, and another sequential refit; a round is kept only when it lowers
            the mean KL(dense || converted) on the calibration images, else undone and the rounds stop.
            Needs `sequential` and `refine_iters`.
        bias_correction: Fit the low-rank terms (and joint refinement) on the *centered* input covariance of each
            attention layer that has a bias, and move the mean output error into that bias (`correct_biases`):
            the optimal affine fit instead of the linear one, at no parameter cost. Needs calibration data. With
            `sequential`, the sequential refit is the affine one too (`sequential_refit(bias_correction=True)`).
    """
    t0 = time.perf_counter()
    dense = _check_dense_vit(dense_model)
    if attn_compression is None and num_atoms is None:
        raise ValueError('give attn_compression (e.g. 0.2) or num_atoms (atoms per group)')
    if attn_compression is not None and not 0.0 <= attn_compression < 1.0:
        raise ValueError(f'attn_compression must be in [0, 1), got {attn_compression}')
    if calib is not None and stats is not None:
        raise ValueError('give calib or precomputed stats, not both')
    have_data = calib is not None or stats is not None
    if refine is None:
        refine = have_data and (attn_compression is not None or refine_rank is not None)
    kinds = _attention_kinds(share)
    depth = len(dense.blocks)
    dim = dense.embed_dim
    p = next(dense.parameters())
    device, dtype = p.device, p.dtype

    vit_kwargs = vit_kwargs_from_dense(dense)
    dense_state = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    weights = _dense_attention_weights(dense_state, dense)

    if refine_iters is None:
        refine_iters = 0  # opt-in: hours for a ViT-B on a CPU (docs/conversion.md), for a small measured gain
    if select is None:
        select = 'calib_kl' if calib is not None and refine_iters and attn_compression is not None else 'objective'
    if select == 'calib_kl' and calib is not None:
        # the candidates' logits are compared with the dense ones image by image: fix the order (and any
        # random augmentation) of the calibration images once
        calib = [x if y is None else (x, y) for x, y in _iter_batches(calib, max_calib_batches)]
        max_calib_batches = None
    if calib is not None:
        stats = collect_calibration(dense, calib, max_batches=max_calib_batches, block_logits=groups == 'auto')
    chol, centered = _whitening(stats, damping, bias_correction, dense_state, dense)
    if refine and chol is None:
        _logger.warning('refine without calibration data: low-rank terms are the plain (unwhitened) truncated SVD')
    if refine_iters < 0:
        raise ValueError(f'refine_iters must be >= 0, got {refine_iters}')
    if refine_method not in ('lbfgs', 'bcd'):
        raise ValueError(f"refine_method must be 'lbfgs' or 'bcd', got {refine_method!r}")
    if select not in ('objective', 'calib_kl'):
        raise ValueError(f"select must be 'objective' or 'calib_kl', got {select!r}")
    if select == 'calib_kl' and (calib is None or not refine_iters or attn_compression is None):
        raise ValueError("select='calib_kl' needs calibration images (calib=...), refine_iters and attn_compression")
    if refine_iters and not refine:
        raise ValueError('refine_iters needs refinement terms: give calibration data and a budget or refine_rank')
    if sequential and (calib is None or not refine):
        raise ValueError('sequential=True needs calibration images (calib=..., not only stats=) and refinement '
                         'terms')
    if sequential and not isinstance(calib, list):
        calib = [x if y is None else (x, y) for x, y in _iter_batches(calib, max_calib_batches)]
        max_calib_batches = None
    if sequential_atom_rounds and not (sequential and refine_iters):
        raise ValueError('sequential_atom_rounds needs sequential=True and refine_iters')

    drift = None
    if isinstance(groups, str):
        if groups != 'auto':
            raise ValueError(f"groups must be an int, a list of start indices or 'auto', got {groups!r}")
        if stats is None or stats.block_logits is None:
            raise ValueError("groups='auto' needs calibration images (calib=...) to measure the KL drift")
        drift = layer_kl_drift(stats.block_logits)
        groups = kl_group_starts(drift, depth, num_groups=auto_groups, min_group_size=min_group_size)
        _logger.info('KL drift between blocks %s -> group starts %s', [round(float(x), 4) for x in drift], groups)
    bounds = resolve_groups(groups, depth)
    if num_atoms is not None:
        num_atoms = [num_atoms] * len(bounds) if isinstance(num_atoms, int) else [int(s) for s in num_atoms]
        if len(num_atoms) != len(bounds):
            raise ValueError(f'num_atoms gives {len(num_atoms)} values for {len(bounds)} groups')
        for g, ((a, b), s) in enumerate(zip(bounds, num_atoms)):
            if not 1 <= s <= b - a:
                raise ValueError(f'num_atoms={s} is larger than group {g} (blocks {a}-{b - 1} hold {b - a} layers); '
                                 f'S must be between 1 and the number of blocks in its group')

    dense_counts = count_params(dense)
    attn_dense = dense_counts['attention']
    fixed = attn_dense - len(kinds) * depth * dim * dim  # what stays per block: biases, unshared projections, norms
    budget = math.floor((1.0 - attn_compression) * attn_dense) if attn_compression is not None else None
    def build(atoms_per_group, rank_per_role, joint):
        ranks = {k: r for k, r in (rank_per_role or {}).items() if r} or None
        masa_kwargs = dict(sharing='masa', num_atoms=atoms_per_group, share=''.join(kinds), dictionary=dictionary,
                           groups=[a for a, _ in bounds], coef='direct', refine_rank=ranks)
        model = _build_masa(vit_kwargs, masa_kwargs)
        _check_same_architecture(dense, model)
        state = convert_state_dict(dense_state, model, whitening=chol)
        if joint is not None:
            _load_joint(state, model, joint, kinds)
        model.load_state_dict(state, strict=True)
        if centered:
            correct_biases(model, dense_state, stats.input_means(centered))
        return model.to(device=device, dtype=dtype), masa_kwargs, ranks

    judge = None
    if select == 'calib_kl':
        def judge(cand, joint):
            candidate = build(cand['num_atoms'], cand['refine_rank'], joint)[0]
            logits, _ = predict_logits(candidate, calib)
            return _compare_logits(stats.logits, logits, None)['mean_kl']

    plan = _plan(weights, bounds, kinds, dictionary == 'common', dim, fixed, budget, num_atoms, refine,
                 refine_rank, chol, rank_step, refine_iters, refine_method, refine_candidates, judge)
    ranks = {k: r for k, r in (plan['refine_rank'] or {}).items() if r} or None
    t_plan = time.perf_counter()

    joint = None
    if refine_iters and ranks:
        joint = plan.get('joint') or _joint_refine_groups(weights, bounds, kinds, dictionary == 'common',
                                                          plan['num_atoms'], ranks, chol, refine_iters, refine_method)
    model, masa_kwargs, ranks = build(plan['num_atoms'], ranks, joint)
    seq = None
    if sequential:
        if not ranks:
            raise ValueError('sequential=True needs refinement terms (the plan allocated no refinement rank)')
        seq = sequential_refit(dense, model, calib, target=sequential_target, sweeps=sequential_sweeps,
                               damping=damping, bias_correction=bias_correction)
        if sequential_atom_rounds:
            seq['atom_rounds'] = _sequential_atom_rounds(
                dense, model, calib, stats.logits, sequential_atom_rounds, bounds, kinds, dictionary == 'common',
                plan['num_atoms'], ranks, refine_iters, refine_method, sequential_target, sequential_sweeps, damping,
                bias_correction)
    model.pretrained_cfg = copy.deepcopy(getattr(dense, 'pretrained_cfg', {}))
    model = model.train(dense.training)
    t_convert = time.perf_counter()

    # the dense count comes from the dense model itself: count_params(model)['attention_dense'] also counts the
    # low-rank terms (they live in a ParameterDict submodule), which would overstate the compression
    counts = count_params(model)
    if budget is not None and counts['attention'] > budget:
        raise AssertionError(f'conversion exceeded its budget: {counts["attention"]} > {budget}')
    report = dict(
        method=('matrix_pca' + ('+joint_refine' if joint else '+refine' if ranks else '')
                + ('+sequential' if seq else '') + ('+bias_correction' if bias_correction else '')),
        config=dict(masa_kwargs, groups=[a for a, _ in bounds], share=''.join(kinds), bias_correction=bias_correction,
                    refine_iters=refine_iters if joint else None, refine_method=refine_method if joint else None,
                    select=select if joint else None, sequential=sequential_target if seq else None),
        sequential=seq,
        target_attn_compression=attn_compression,
        params=dict(
            total_dense=dense_counts['total'], total=counts['total'], attention_dense=attn_dense,
            attention=counts['attention'], attention_budget=budget,
            attention_compression=1.0 - counts['attention'] / attn_dense,
            breakdown=_param_breakdown(model),
        ),
        calibration=dict(num_images=stats.num_images, num_tokens=stats.num_tokens) if stats else None,
        kl_drift=[float(x) for x in drift] if drift is not None else None,
        plan_candidates=plan['candidates'],
        plan_lowrank_only=plan.get('lowrank_only'),
        joint_refine=dict(iters=refine_iters, method=refine_method, history=joint['history']) if joint else None,
        atom_energy=_atom_energy(weights, bounds, kinds, plan['num_atoms']),
        layers=_layer_errors(dense_state, model, weights, chol),
        seconds=dict(plan=t_plan - t0, convert=t_convert - t_plan),
    )
    data = eval_data if eval_data is not None else calib
    if data is not None:
        dense_logits = stats.logits if (eval_data is None and stats is not None and max_eval_batches is None
                                        and max_calib_batches is None) else None
        report['eval'] = evaluate_agreement(dense, model, data, max_eval_batches or max_calib_batches,
                                            dense_logits=dense_logits)
        report['eval']['data'] = 'held-out' if eval_data is not None else 'calibration'
    report['seconds']['total'] = time.perf_counter() - t0
    model.conversion_report = report
    _logger.info('converted: attention %d -> %d parameters (%.1f%% compression), atoms %s, ranks %s, %.1fs',
                 attn_dense, counts['attention'], 100 * report['params']['attention_compression'], plan['num_atoms'], ranks,
                 report['seconds']['total'])
    return model


def _atom_energy(weights, bounds, kinds, atoms_per_group) -> List[Dict[str, Any]]:
    """How much the blocks of each group share: the fraction of sum_l ||W_l||^2 the S atoms capture, next to S / L,
    what they capture when the layers share nothing (a flat Gram spectrum)."""
    rows = []
    for g, ((a, b), s) in enumerate(zip(bounds, atoms_per_group)):
        for k in kinds:
            eig = matrix_pca_spectrum(torch.stack([weights[(l, k)] for l in range(a, b)]))
            rows.append(dict(group=g, proj=k, atoms=s, blocks=b - a, captured=float(eig[:s].sum() / eig.sum()),
                             uniform=s / (b - a)))
    return rows


def _param_breakdown(model: MasaVisionTransformer) -> Dict[str, int]:
    out = dict(atoms=0, coef=0, lowrank=0, per_block=0)
    for n, p in model.dictionaries.named_parameters():
        out['atoms' if n.endswith('atoms') else 'coef'] += p.numel()
    for blk in model.blocks:
        for n, p in blk.attn.named_parameters():
            out['lowrank' if '.lowrank.' in n else 'per_block'] += p.numel()
    return out


@torch.no_grad()
def _layer_errors(
        dense_state: Mapping[str, torch.Tensor],
        model: nn.Module,
        weights: Mapping[Tuple[int, str], torch.Tensor],
        chol: Optional[Mapping[str, torch.Tensor]],
) -> List[Dict[str, Any]]:
    """Per block and projection: relative weight error and (with calibration) relative output error."""
    rows = []
    for i, name, lname, layer, kinds in _attention_layers(model):
        w_hat = (layer.composed_weight() if isinstance(layer, AtomLinear) else layer.weight).detach().cpu().double()
        pf = w_hat.shape[0] // len(kinds)
        c = chol.get(name) if chol is not None else None
        for j, kind in enumerate(kinds):
            w = weights[(i, kind)]
            diff = w - w_hat[j * pf:(j + 1) * pf]
            row = dict(block=i, proj=kind, rel_error=float(diff.norm() / w.norm().clamp_min(1e-30)))
            if c is not None:
                row['rel_output_error'] = float((diff @ c).norm() / (w @ c).norm().clamp_min(1e-30))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# Same-budget SVD baselines
# ---------------------------------------------------------------------------------------------------

def lowrank_rank_for_budget(dense_model: nn.Module, attn_compression: float, share: str = 'qkvo') -> int:
    """The largest per-projection rank r whose low-rank attention fits the budget of `attn_compression`."""
    dense = _check_dense_vit(dense_model)
    kinds = _attention_kinds(share)
    depth, dim = len(dense.blocks), dense.embed_dim
    attn_dense = count_params(dense)['attention']
    fixed = attn_dense - len(kinds) * depth * dim * dim
    budget = math.floor((1.0 - attn_compression) * attn_dense)
    return (budget - fixed) // (len(kinds) * depth * 2 * dim)


def svd_from_dense(
        dense_model: nn.Module,
        attn_compression: Optional[float] = None,
        rank: Optional[int] = None,
        calib: Optional[Iterable] = None,
        share: str = 'qkvo',
        max_calib_batches: Optional[int] = None,
        stats: Optional[CalibrationStats] = None,
        damping: float = 1e-2,
        sequential: bool = False,
        sequential_target: str = 'dense',
        bias_correction: bool = False,
) -> MasaVisionTransformer:
    """Same-budget baselines: every shared projection replaced by its per-layer rank-r factorization U V.

    Plain truncated SVD without calibration data; with `calib` (or precomputed `stats`), the data-aware whitened SVD
    of SVD-LLM (Wang et al. 2024, https://arxiv.org/abs/2403.07378). Returns a `MasaVisionTransformer` with
    sharing='low_rank' (so `count_params` counts it like MASA) and the report as `model.conversion_report`.
    `sequential=True` (needs `calib` images) then refits the factors block by block on the converted model's own
    activations (`sequential_refit`, the same option as `from_dense`'s). `bias_correction=True` (with data): the
    centered whitened SVD plus the mean output error moved into each bias (and the affine sequential refit), as in
    `from_dense`.
    """
    dense = _check_dense_vit(dense_model)
    if rank is None:
        if attn_compression is None:
            raise ValueError('give attn_compression or rank')
        rank = lowrank_rank_for_budget(dense, attn_compression, share)
    if rank < 1:
        raise ValueError(f'attn_compression={attn_compression} leaves no room for a rank-1 factorization')
    if sequential and calib is None:
        raise ValueError('sequential=True needs calibration images (calib=...)')
    if sequential and not isinstance(calib, list):
        calib = [x if y is None else (x, y) for x, y in _iter_batches(calib, max_calib_batches)]
        max_calib_batches = None
    if stats is None and calib is not None:
        stats = collect_calibration(dense, calib, max_batches=max_calib_batches, block_logits=False)
    p = next(dense.parameters())
    dense_state = {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    chol, centered = _whitening(stats, damping, bias_correction, dense_state, dense)
    model = _build_masa(vit_kwargs_from_dense(dense), dict(sharing='low_rank', rank=rank, share=share))
    _check_same_architecture(dense, model)
    model.load_state_dict(convert_state_dict(dense_state, model, whitening=chol), strict=True)
    if centered:
        correct_biases(model, dense_state, stats.input_means(centered))
    model.pretrained_cfg = copy.deepcopy(getattr(dense, 'pretrained_cfg', {}))
    model = model.to(device=p.device, dtype=p.dtype).train(dense.training)
    seq = (sequential_refit(dense, model, calib, target=sequential_target, damping=damping,
                            bias_correction=bias_correction) if sequential else None)
    counts, dense_counts = count_params(model), count_params(dense)
    model.conversion_report = dict(
        method=(('whitened_svd' if chol is not None else 'truncated_svd') + ('+sequential' if seq else '')
                + ('+bias_correction' if bias_correction else '')),
        rank=rank,
        sequential=seq,
        target_attn_compression=attn_compression,
        params=dict(attention_dense=dense_counts['attention'], attention=counts['attention'],
                    attention_compression=1.0 - counts['attention'] / dense_counts['attention'],
                    total_dense=dense_counts['total'], total=counts['total']),
        layers=_layer_errors(dense_state, model, _dense_attention_weights(dense_state, dense), chol),
    )
    return model


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def report_to_markdown(report: Mapping[str, Any]) -> str:
    """Render a conversion report (from `from_dense` / `svd_from_dense`) as markdown."""
    lines = [f"# MASA conversion report: {report.get('method', '')}", '']
    cfg = report.get('config')
    if cfg:
        lines.append('Config: ' + ', '.join(f'{k}={v}' for k, v in cfg.items() if v is not None))
        lines.append('')
    par = report['params']
    lines += [
        '| | dense | converted |', '|---|---:|---:|',
        f"| attention params | {par['attention_dense']:,} | {par['attention']:,} |",
    ]
    if 'total_dense' in par:
        lines.append(f"| total params | {par['total_dense']:,} | {par['total']:,} |")
    lines += ['', f"Attention compression: {100 * par['attention_compression']:.2f}%"
              + (f" (target {100 * report['target_attn_compression']:.1f}%, budget {par.get('attention_budget'):,})"
                 if report.get('target_attn_compression') is not None and par.get('attention_budget') else ''), '']
    if par.get('breakdown'):
        lines.append('Attention parameters: ' + ', '.join(f'{k} {v:,}' for k, v in par['breakdown'].items()))
        lines.append('')
    ev = report.get('eval')
    if ev:
        lines += [f"## Outputs ({ev.get('data', '')} set, {ev['num_images']} images)", '',
                  '| top-1 dense | top-1 converted | kept | agreement | mean KL |', '|---:|---:|---:|---:|---:|']
        if 'top1' in ev:
            lines.append(f"| {100 * ev['top1_dense']:.2f} | {100 * ev['top1']:.2f} | {100 * ev['top1_kept']:.1f}% | "
                         f"{100 * ev['agreement']:.2f} | {ev['mean_kl']:.4f} |")
        else:
            lines.append(f"| - | - | - | {100 * ev['agreement']:.2f} | {ev['mean_kl']:.4f} |")
        lines.append('')
    if report.get('atom_energy'):
        lines += ['Energy of the dense weights captured by the atoms (Matrix PCA; S/L when the blocks share nothing): '
                  + ', '.join(f"g{r['group']} {r['proj']} {r['captured']:.3f} ({r['uniform']:.3f})"
                              for r in report['atom_energy']), '']
    cands = report.get('plan_candidates')
    if cands:
        ref = report.get('plan_lowrank_only')
        lines += ['Budget plan (mean relative whitened output energy left, lower is better): '
                  + ', '.join(f"S={c['num_atoms']} {c['score']:.3g}"
                              + (f" (jointly refined {c['refined_score']:.3g})" if 'refined_score' in c else '')
                              for c in cands)
                  + (f"; no atoms, low rank only {ref['score']:.3g}" if ref else ''), '']
    jr = report.get('joint_refine')
    if jr:
        lines += [f"Joint refinement ({jr.get('method', 'bcd')}, {jr['iters']} iterations), "
                  "whitened objective start -> end: "
                  + ', '.join(f"g{h['group']} {h['proj']} {h['objective'][0]:.3g} -> {h['objective'][-1]:.3g}"
                              for h in jr['history']), '']
    if report.get('kl_drift'):
        lines += ['KL drift between consecutive blocks: ' + ', '.join(f'{x:.3g}' for x in report['kl_drift']), '']
    rows = report.get('layers') or []
    if rows:
        has_out = 'rel_output_error' in rows[0]
        kinds = sorted({r['proj'] for r in rows}, key=KINDS.index)
        lines += ['## Relative reconstruction error per block (weights' + (' / outputs on calibration' if has_out else '')
                  + ')', '', '| block | ' + ' | '.join(kinds) + ' |', '|---:|' + '---:|' * len(kinds)]
        by_block: Dict[int, Dict[str, Dict]] = {}
        for r in rows:
            by_block.setdefault(r['block'], {})[r['proj']] = r
        for b in sorted(by_block):
            cells = []
            for k in kinds:
                r = by_block[b].get(k)
                if r is None:
                    cells.append('-')
                else:
                    cells.append(f"{r['rel_error']:.3f}" + (f" / {r['rel_output_error']:.3f}" if has_out else ''))
            lines.append(f'| {b} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    if report.get('seconds'):
        lines.append('Time: ' + ', '.join(f'{k} {v:.2f}s' for k, v in report['seconds'].items()))
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------
# Saving and loading converted models
# ---------------------------------------------------------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, functools.partial):
        return {'__partial__': _to_json(value.func), 'kwargs': {k: _to_json(v) for k, v in value.keywords.items()}}
    if isinstance(value, type) or callable(value):
        return {'__class__': f'{value.__module__}:{value.__qualname__}'}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


_TRUSTED_MODULES = ('torch.nn', 'timm.layers', 'timm.models', 'masa_vit')


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if '__class__' in value:
            module, name = value['__class__'].split(':')
            # a file's metadata must not be able to name arbitrary code: only layers from torch.nn, timm and masa_vit
            if not any(module == m or module.startswith(m + '.') for m in _TRUSTED_MODULES):
                raise ValueError(
                    f"refusing to load {value['__class__']!r} named in the file's metadata: only layers from "
                    f"{', '.join(_TRUSTED_MODULES)} are allowed. Rebuild the model yourself and load the weights.")
            obj = importlib.import_module(module)
            for part in name.split('.'):
                obj = getattr(obj, part)
            return obj
        if '__partial__' in value:
            return functools.partial(_from_json(value['__partial__']), **_from_json(value['kwargs']))
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


_CFG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes', 'architecture')


def save_converted(model: MasaVisionTransformer, path: str, **source: Any) -> None:
    """Save a converted model as safetensors, with what `load_converted` needs to rebuild it in the metadata
    (the ViT and MASA constructor options, the data config, and any `source` notes). Atomic: written to
    `path.tmp`, fsynced, then renamed over `path`, so an interrupted save leaves an existing file as it was."""
    from safetensors.torch import save_file
    model = _unwrap(model)
    cfg = {k: v for k, v in (getattr(model, 'pretrained_cfg', None) or {}).items() if k in _CFG_KEYS}
    metadata = {
        'format': 'masa-vit',
        'vit_kwargs': json.dumps(_to_json(model._vit_kwargs)),
        'masa_kwargs': json.dumps(_to_json(model.masa_kwargs)),
        'pretrained_cfg': json.dumps(_to_json(cfg)),
        'source': json.dumps(_to_json(source), default=str),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_path = path + '.tmp'
    try:
        save_file(state, tmp_path, metadata=metadata)
        with open(tmp_path, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def load_converted(path: str, device: Union[str, torch.device] = 'cpu') -> MasaVisionTransformer:
    """Rebuild a model saved by `save_converted` / `masa-convert` and load its weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework='pt') as f:
        metadata = f.metadata() or {}
    if metadata.get('format') != 'masa-vit':
        raise ValueError(f'{path} was not written by masa-convert / save_converted (no masa-vit metadata); load it '
                         "with timm.create_model('masa_vit_...', pretrained_cfg_overlay=dict(file=...)) instead")
    vit_kwargs = _from_json(json.loads(metadata['vit_kwargs']))
    masa_kwargs = _from_json(json.loads(metadata['masa_kwargs']))
    model = _build_masa(vit_kwargs, masa_kwargs)
    model.load_state_dict(load_file(path), strict=True)
    cfg = _from_json(json.loads(metadata.get('pretrained_cfg', '{}')))
    model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, **cfg)
    return model.to(device).eval()
