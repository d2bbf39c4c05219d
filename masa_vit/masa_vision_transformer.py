""" MASA Vision Transformer (ViT) in PyTorch, as a timm model family.

A timm `VisionTransformer` whose attention projections (Q, K, V, O) are linear combinations of a small dictionary of
matrix atoms shared across blocks:

    W[p, l] = sum_s c[p, l, s] * D[p, s],   p in {q, k, v, o}, l = block, s = atom

Paper:
    * `Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning`
        - https://arxiv.org/abs/2508.04581 (Zhussip, Shopkhoev, Ali, Lefkimmiatis, AAAI 2026)
    * `An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale`
        - https://arxiv.org/abs/2010.11929

Layout: the shared dictionaries live once on the model (`model.dictionaries[g]`, one per group of blocks); each
block keeps timm's `Attention` and swaps its `qkv` / `proj` linears for `AtomLinear` layers holding what is per block
(biases, unshared parts, low-rank refinement terms). Every tensor is stored once in `parameters()`, `state_dict()`
and saved files (safetensors refuses duplicated tensors).

Sharing methods (`sharing=`), all with the same attention parameter accounting (`count_params`):
    * 'masa': the paper's method (default), with `coef='direct'` or the paper's training-time `coef='mlp'`.
    * 'dense': the exact dense twin (a plain timm ViT with the same init recipe).
    * 'sequential': S weight sets, consecutive blocks share one (Takase & Kiyono 2021).
    * 'cycle': S weight sets, block l uses set l mod S (repeat-all-over).
    * 'low_rank': each shared projection is a per-block rank-r product U V.
    * 'gqa': grouped-query attention, fewer key/value heads (`num_kv_heads`); its own budget (41.7% with one kv head
      in a 6-head model).
Beyond the paper, `share='qkvo+mlp'` also shares the MLP's fc1 and fc2 through dictionaries of their own.
"""
import copy
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import named_apply
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn, get_init_weights_vit

from . import dictionary as _dictionary
from .attention import AtomLinear, GroupedQueryAttention, _is_tracing
from .dictionary import AtomDictionary, COEF_MODES

__all__ = [
    'MasaVisionTransformer', 'SharedWeightBlocks', 'to_dense', 'count_params', 'coefficient_matrices',
    'checkpoint_filter_fn',
]

_logger = logging.getLogger(__name__)

ATTN_KINDS = ('q', 'k', 'v', 'o')
SHARING_METHODS = ('masa', 'dense', 'sequential', 'cycle', 'low_rank', 'gqa')
DICTIONARY_TYPES = ('separate', 'common')

# timm's dense equivalents of the registered 224 px shapes (for to_dense and the pretrained tags)
DENSE_EQUIVALENT = {
    'masa_vit_tiny': 'vit_tiny_patch16_224',
    'masa_vit_small': 'vit_small_patch16_224',
    'masa_vit_base': 'vit_base_patch16_224',
    'masa_vit_large': 'vit_large_patch16_224',
}


def parse_share(share: Union[str, Sequence[str]]) -> Tuple[Tuple[str, ...], bool]:
    """Parse a `share` spec into (attention kinds in q, k, v, o order, share the MLP too).

    Accepts 'qkvo', 'qkv', 'q,k', ['q', 'v'], and '+mlp' to share the MLP as well ('qkvo+mlp', or 'mlp' alone).
    """
    spec = ''.join(share) if share is not None else ''
    spec = spec.replace(',', '').replace(' ', '').lower()
    tokens = spec.split('+')
    share_mlp = 'mlp' in tokens
    letters = ''.join(t for t in tokens if t != 'mlp')
    unknown = sorted(set(letters) - set(ATTN_KINDS))
    if unknown or not (letters or share_mlp):
        raise ValueError(
            f"share={share!r} is invalid{' (unknown letters ' + repr(''.join(unknown)) + ')' if unknown else ''}: "
            f"use a non-empty subset of 'q', 'k', 'v', 'o', optionally with '+mlp', e.g. share='qkvo' (all four), "
            f"share='qkv' or share='qkvo+mlp'.")
    return tuple(k for k in ATTN_KINDS if k in letters), share_mlp


def resolve_groups(groups: Union[int, Sequence[int]], depth: int) -> List[Tuple[int, int]]:
    """Turn `groups` (a count, or the start index of each group) into contiguous (start, stop) block ranges."""
    if isinstance(groups, int) and not isinstance(groups, bool):
        if not 1 <= groups <= depth:
            raise ValueError(f"groups={groups} is out of range: it must be between 1 and depth={depth}.")
        edges = [round(i * depth / groups) for i in range(groups + 1)]
    else:
        starts = [int(s) for s in groups]
        if starts and starts[-1] == depth:
            starts = starts[:-1]
        ok = bool(starts) and starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < depth
        if not ok:
            raise ValueError(
                f"groups={list(groups)} does not partition the {depth} blocks into contiguous groups: give the number "
                f"of groups, or increasing start indices beginning at 0 and below {depth}, e.g. groups=[0, {depth // 2}].")
        edges = starts + [depth]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


class MasaVisionTransformer(VisionTransformer):
    """Vision Transformer with attention weights shared through matrix atom dictionaries (MASA).

    Takes every `timm.models.VisionTransformer` argument plus the sharing options below.
    """

    def __init__(
            self,
            sharing: str = 'masa',
            num_atoms: Optional[Union[int, Sequence[int]]] = None,
            share: Union[str, Sequence[str]] = 'qkvo',
            dictionary: str = 'separate',
            groups: Union[int, Sequence[int]] = 1,
            coef: str = 'direct',
            coef_embed_dim: int = 64,
            coef_hidden_dim: int = 64,
            refine_rank: Optional[Union[int, Dict[str, int]]] = None,
            rank: Optional[int] = None,
            num_kv_heads: int = 1,
            mlp_num_atoms: Optional[Union[int, Sequence[int]]] = None,
            **kwargs: Any,
    ):
        """
        Args:
            sharing: 'masa' (default), 'dense' (the dense twin), 'sequential', 'cycle' or 'low_rank'.
            num_atoms: Atoms S per dictionary (per group: an int, or one int per group). Default: blocks in the
                group // 3 (S = L/3 gives 66.7% fewer parameters in the shared projections).
            share: Projections to share, any subset of 'qkvo' (default all four; 'qkv' keeps O per block).
            dictionary: 'separate' (one dictionary per projection, default) or 'common' (one for all projections).
            groups: Number of contiguous groups of blocks with their own dictionaries, or the start index of each.
            coef: Coefficient parameterization, 'direct' (default) or 'mlp' (per-block embedding + shared 3-layer MLP,
                the paper's training-time parameterization; `fold_coefficients()` turns it into 'direct').
            coef_embed_dim: Embedding width for coef='mlp'.
            coef_hidden_dim: Hidden width of the coefficient MLP for coef='mlp'.
            refine_rank: Rank of a per-block low-rank term added to each shared projection (int, or per kind, e.g.
                dict(q=32, k=16, v=16, o=32)); set by the training-free conversion (`masa_vit.from_dense`).
            rank: Rank r of each projection for sharing='low_rank'. Default: the rank with MASA's budget at the same
                S, r = d * S / (2 L) (d / 6 at S = L / 3).
            num_kv_heads: Key/value heads for sharing='gqa' (must divide num_heads).
            mlp_num_atoms: Atoms per MLP dictionary with share='...+mlp' (default: num_atoms).
            **kwargs: timm VisionTransformer arguments (img_size, patch_size, embed_dim, depth, num_heads, ...).
        """
        embed_dim = kwargs.get('embed_dim', 768)
        num_heads = kwargs.get('num_heads', 12)
        depth = kwargs.get('depth', 12)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}: pick num_heads that divides "
                f"embed_dim (e.g. num_heads={max(h for h in range(1, num_heads + 1) if embed_dim % h == 0)}).")
        if sharing not in SHARING_METHODS:
            raise ValueError(f"sharing={sharing!r} is unknown: use one of {SHARING_METHODS}.")
        if dictionary not in DICTIONARY_TYPES:
            raise ValueError(f"dictionary={dictionary!r} is unknown: use one of {DICTIONARY_TYPES}.")
        if coef not in ('direct', 'mlp'):
            raise ValueError(f"coef={coef!r} is unknown: use 'direct' or 'mlp'.")
        kinds, share_mlp = parse_share(share)
        bounds = resolve_groups(groups, depth)
        if num_atoms is None:
            atoms_per_group = [max(1, (b - a) // 3) for a, b in bounds]
        elif isinstance(num_atoms, int):
            atoms_per_group = [num_atoms] * len(bounds)
        else:
            atoms_per_group = [int(s) for s in num_atoms]
            if len(atoms_per_group) != len(bounds):
                raise ValueError(
                    f"num_atoms={list(num_atoms)} gives {len(atoms_per_group)} values for {len(bounds)} groups: "
                    f"give one int, or one per group.")
        mlp_atoms_per_group = atoms_per_group
        if mlp_num_atoms is not None:
            mlp_atoms_per_group = [mlp_num_atoms] * len(bounds) if isinstance(mlp_num_atoms, int) else list(mlp_num_atoms)
            if len(mlp_atoms_per_group) != len(bounds):
                raise ValueError(f"mlp_num_atoms={mlp_num_atoms} gives {len(mlp_atoms_per_group)} values for "
                                 f"{len(bounds)} groups: give one int, or one per group.")
        if sharing == 'gqa':
            if share_mlp:
                raise ValueError("share='...+mlp' is not defined for sharing='gqa': GQA changes attention heads only.")
            if not 1 <= num_kv_heads <= num_heads or num_heads % num_kv_heads:
                raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}.")
        if sharing in ('masa', 'sequential', 'cycle'):
            for g, ((a, b), s) in enumerate(zip(bounds, atoms_per_group)):
                if not 1 <= s <= b - a:
                    raise ValueError(
                        f"num_atoms={s} is out of range for group {g} (blocks {a}-{b - 1}): it must be between 1 and "
                        f"{b - a}, the number of blocks in the group.")
            for g, ((a, b), s) in enumerate(zip(bounds, mlp_atoms_per_group if share_mlp else [])):
                if not 1 <= s <= b - a:
                    raise ValueError(
                        f"mlp_num_atoms={s} is out of range for group {g} (blocks {a}-{b - 1}): it must be between 1 "
                        f"and {b - a}, the number of blocks in the group.")
        if isinstance(refine_rank, int):
            refine_rank = {k: refine_rank for k in kinds} if refine_rank > 0 else None
        elif refine_rank:
            bad = set(refine_rank) - set(kinds)
            if bad:
                raise ValueError(
                    f"refine_rank has unknown or unshared projections {sorted(bad)}: use keys among the shared "
                    f"projections {''.join(kinds)!r}.")
            refine_rank = {k: int(r) for k, r in refine_rank.items() if r}
        if sharing == 'low_rank':
            if rank is None:
                s0, l0 = atoms_per_group[0], bounds[0][1] - bounds[0][0]
                rank = max(1, round(embed_dim * s0 / (2 * l0)))
            if not 1 <= rank < embed_dim // 2:
                raise ValueError(f"rank={rank} is out of range for sharing='low_rank': use 1 <= rank < {embed_dim // 2}.")

        super().__init__(**kwargs)
        self.sharing = sharing
        self.masa_kwargs = dict(sharing=sharing)
        if sharing == 'gqa':
            self.masa_kwargs['num_kv_heads'] = num_kv_heads
        elif sharing != 'dense':
            self.masa_kwargs.update(
                num_atoms=atoms_per_group if len(set(atoms_per_group)) > 1 else atoms_per_group[0],
                share=''.join(kinds) + ('+mlp' if share_mlp else ''), groups=[a for a, _ in bounds])
            if sharing == 'masa':
                self.masa_kwargs.update(dictionary=dictionary, coef=coef)
                if coef == 'mlp':
                    self.masa_kwargs.update(coef_embed_dim=coef_embed_dim, coef_hidden_dim=coef_hidden_dim)
                if refine_rank:
                    self.masa_kwargs['refine_rank'] = dict(refine_rank)
            if sharing == 'low_rank':
                self.masa_kwargs['rank'] = rank
            if share_mlp and mlp_num_atoms is not None:
                self.masa_kwargs['mlp_num_atoms'] = mlp_num_atoms
        self._vit_kwargs = dict(kwargs)
        self.group_bounds = bounds
        self.dictionaries = nn.ModuleList()
        self.mlp_dictionaries = nn.ModuleList()
        if sharing == 'dense':
            self._masa_built = True
            return

        dd = {'device': self.cls_token.device if self.cls_token is not None else None,
              'dtype': self.patch_embed.proj.weight.dtype}
        if sharing == 'gqa':
            for blk in self.blocks:
                attn = blk.attn
                blk.attn = GroupedQueryAttention(
                    embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    qkv_bias=attn.qkv.bias is not None, qk_norm=not isinstance(attn.q_norm, nn.Identity),
                    proj_bias=attn.proj.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                    norm_layer=type(attn.q_norm) if not isinstance(attn.q_norm, nn.Identity) else None, **dd)
                if kwargs.get('weight_init', '') != 'skip':  # the dense twin's init, not nn.Linear's default
                    named_apply(get_init_weights_vit(self.weight_init_mode), blk.attn)
            self._masa_built = True
            return

        for (a, b), num_s, mlp_s in zip(bounds, atoms_per_group, mlp_atoms_per_group):
            group_len = b - a

            def _dictionary(dict_kinds, s, out_f, in_f, common=False):
                if sharing == 'low_rank':
                    return None
                assign = None
                if sharing == 'sequential':
                    assign = [l * s // group_len for l in range(group_len)]
                elif sharing == 'cycle':
                    assign = [l % s for l in range(group_len)]
                return AtomDictionary(
                    dict_kinds, group_len, s, out_f, in_f, common=common,
                    coef=coef if sharing == 'masa' else 'select', assign=assign,
                    coef_embed_dim=coef_embed_dim, coef_hidden_dim=coef_hidden_dim, **dd)

            shared_base = 'none' if sharing == 'low_rank' else 'shared'
            if kinds:
                attn_dict = _dictionary(kinds, num_s, embed_dim, embed_dim, common=dictionary == 'common')
                if attn_dict is not None:
                    self.dictionaries.append(attn_dict)
                lowrank = {k: rank for k in kinds} if sharing == 'low_rank' else (refine_rank or {})
                for l in range(a, b):
                    attn = self.blocks[l].attn
                    qkv_bases = [shared_base if k in kinds else 'own' for k in 'qkv']
                    if qkv_bases != ['own'] * 3:
                        attn.qkv = AtomLinear(
                            embed_dim, embed_dim, ('q', 'k', 'v'), qkv_bases, bias=attn.qkv.bias is not None,
                            dictionary=attn_dict, block=l - a, lowrank=lowrank, **dd)
                    if 'o' in kinds:  # otherwise O stays timm's per-block nn.Linear
                        attn.proj = AtomLinear(
                            embed_dim, embed_dim, ('o',), [shared_base], bias=attn.proj.bias is not None,
                            dictionary=attn_dict, block=l - a, lowrank=lowrank, **dd)
            if share_mlp:
                mlp0 = self.blocks[a].mlp
                if not (isinstance(getattr(mlp0, 'fc1', None), nn.Linear) and isinstance(getattr(mlp0, 'fc2', None), nn.Linear)):
                    raise ValueError(f"share='+mlp' needs timm's Mlp (fc1, fc2); got {type(mlp0).__name__}.")
                hidden = mlp0.fc1.out_features
                fc_dicts = nn.ModuleDict({
                    'fc1': _dictionary(('fc1',), mlp_s, hidden, embed_dim),
                    'fc2': _dictionary(('fc2',), mlp_s, embed_dim, hidden),
                }) if sharing != 'low_rank' else None
                if fc_dicts is not None:
                    self.mlp_dictionaries.append(fc_dicts)
                # low-rank with MASA's budget: r (h + d) = (S / L) h d
                mlp_rank = max(1, round(mlp_s * hidden * embed_dim / (group_len * (hidden + embed_dim))))
                for l in range(a, b):
                    mlp = self.blocks[l].mlp
                    for name, out_f, in_f in (('fc1', hidden, embed_dim), ('fc2', embed_dim, hidden)):
                        setattr(mlp, name, AtomLinear(
                            in_f, out_f, (name,), [shared_base], bias=getattr(mlp, name).bias is not None,
                            dictionary=fc_dicts[name] if fc_dicts is not None else None, block=l - a,
                            lowrank={name: mlp_rank} if sharing == 'low_rank' else None, **dd))
        self.blocks = SharedWeightBlocks(*self.blocks)
        self._masa_built = True
        if self.fix_init:
            self.fix_init_weight()
        self.register_load_state_dict_pre_hook(_check_not_dense_checkpoint)

    def __prepare_scriptable__(self) -> 'MasaVisionTransformer':
        if any(isinstance(m, (AtomLinear, AtomDictionary)) for m in self.modules()):
            raise RuntimeError(
                "torch.jit.script cannot compile a MASA model: the shared atoms are stored once on the model and each "
                "block reaches them by reference, which TorchScript (deprecated by PyTorch) cannot follow. Use "
                "torch.compile or torch.export, or script the dense export: torch.jit.script(masa_vit.to_dense(model)).")
        return self

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        """timm's init fix (scale each block's output projections by 1 / sqrt(2 (l + 1))), on composed weights."""
        if not getattr(self, '_masa_built', False):
            return  # called from VisionTransformer.__init__ before the shared layers exist; applied once built
        for layer_id, blk in enumerate(self.blocks):
            scale = math.sqrt(2.0 * (layer_id + 1))
            for layer in (blk.attn.proj, blk.mlp.fc2):
                if isinstance(layer, AtomLinear):
                    _scale_atom_linear_(layer, 1.0 / scale)
                else:
                    layer.weight.div_(scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's no-decay set plus every dictionary coefficient parameter (direct or MLP-produced)."""
        nwd = set(super().no_weight_decay())
        for prefix in ('dictionaries', 'mlp_dictionaries'):
            for n, _ in getattr(self, prefix).named_parameters():
                if not n.endswith('atoms'):
                    nwd.add(f'{prefix}.{n}')
        return nwd

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """timm's ViT grouping; each group's dictionary joins the group of its first block.

        The atoms feed every block of their group; with layer-wise lr decay they get the scale of the group's
        earliest block, the most conservative of the scales of the blocks that use them.
        """
        dict_rules = [(rf'^(?:mlp_)?dictionaries\.{g}\.', (a,)) for g, (a, _) in enumerate(self.group_bounds)]
        return dict(
            stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre',
            blocks=dict_rules + [(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    def fold_coefficients(self) -> 'MasaVisionTransformer':
        """Replace each coefficient MLP by the fixed coefficient matrix it produces (coef='mlp' -> 'direct').

        The outputs do not change; the folded model's state dict loads into a model built with coef='direct'.
        """
        for d in self.modules():
            if isinstance(d, AtomDictionary):
                d.fold()
        for m in self.modules():
            if isinstance(m, AtomLinear):
                m.clear_cache()
        if self.masa_kwargs.get('coef') == 'mlp':
            self.masa_kwargs['coef'] = 'direct'
            self.masa_kwargs.pop('coef_embed_dim', None)
            self.masa_kwargs.pop('coef_hidden_dim', None)
        return self

    def clear_cache(self) -> None:
        """Drop the cached eval-mode weights and the dictionaries' batched compositions (rebuilt when needed)."""
        for m in self.modules():
            if isinstance(m, (AtomLinear, AtomDictionary, SharedWeightBlocks)):
                m.clear_cache()


class SharedWeightBlocks(nn.Sequential):
    """The blocks of a MASA model: an `nn.Sequential` that, in eval mode without autograd, validates the shared
    layers' cached weights once per forward pass instead of once per layer call.

    The state the weights depend on (the optimizer step count, each dictionary's tensors, the own tensors of layers
    that have some) is read once per pass; while it is unchanged the layers get the weights validated for it and
    skip their own check. At batch 1 of a small model the per-layer checks cost 3-5% of the forward (docs/speed.md).
    Blocks called one by one (`forward_intermediates`, attention masks) still check per layer, with the same result.
    A parameter changed in place during the pass itself (from a forward hook) takes effect from the next call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or _is_tracing():
            return super().forward(x)
        layers, dicts, own = self._layers()
        steps = _dictionary._optimizer_steps
        dict_keys = tuple(d.state_key() for d in dicts)
        state = (steps, dict_keys, tuple(layer._state_key(steps, ()) for layer in own))
        plan = self.__dict__.get('_plan')
        if plan is None or plan[0] != state:
            keys = {d: (steps, k) for d, k in zip(dicts, dict_keys)}
            keys[None] = (steps, ())
            weights = []
            for layer in layers:
                key = keys[layer.dictionary]
                if layer._has_own_deps:
                    key = layer._state_key(steps, key[1])
                weights.append(layer._eval_weight(key))
            plan = self.__dict__['_plan'] = (state, weights)
        box = self.__dict__['_box']
        box[0] = plan[1]
        try:
            return super().forward(x)
        finally:
            box[0] = None

    def _layers(self) -> Tuple[List[AtomLinear], List[AtomDictionary], List[AtomLinear]]:
        """(shared layers, their distinct dictionaries, the layers with own tensors), listed once (after module
        surgery clear_cache() lists them again; a layer not listed checks for itself)."""
        found = self.__dict__.get('_found')
        if found is None:
            layers = [m for m in self.modules() if isinstance(m, AtomLinear)]
            dicts = list({id(l.dictionary): l.dictionary for l in layers if l.dictionary is not None}.values())
            box = self.__dict__['_box'] = [None]
            for i, layer in enumerate(layers):  # a layer in two SharedWeightBlocks (a slice) serves the last one listed
                layer.__dict__['_slot'] = (box, i)
            found = self.__dict__['_found'] = (layers, dicts, [l for l in layers if l._has_own_deps])
        return found

    def clear_cache(self) -> None:
        for layer in self.__dict__.pop('_found', ((),))[0]:
            layer.__dict__['_slot'] = None
        self.__dict__.pop('_plan', None)

    def train(self, mode: bool = True):
        self.__dict__.pop('_plan', None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop('_plan', None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ('_plan', '_found', '_box'):  # never pickle or deep-copy cached weights
            state.pop(key, None)
        return state


def _scale_atom_linear_(layer: AtomLinear, factor: float) -> None:
    """Scale the composed weight of one block's `AtomLinear` in place (own rows, low-rank U, or its coefficients)."""
    if layer.weight is not None:
        layer.weight.mul_(factor)
    for p, b in zip(layer.parts, layer.bases):
        if p in layer.lowrank_ranks:
            layer.lowrank[f'{p}_u'].mul_(factor)
        if b == 'shared':
            d = layer.dictionary
            if d.coef_mode != 'direct':
                raise ValueError(
                    f"fix_init=True needs per-block coefficients to scale the shared '{p}' projection; "
                    f"it is not available with coef='{d.coef_mode}'. Use coef='direct' or fix_init=False.")
            d.coef[d.kinds.index(p), layer.block].mul_(factor)
    layer.clear_cache()


def _check_not_dense_checkpoint(module, state_dict, prefix, *args, **kwargs) -> None:
    """load_state_dict pre-hook: refuse a dense ViT state dict with a pointer to the conversion API."""
    if not (len(module.dictionaries) or len(module.mlp_dictionaries)):
        return
    if any(k.startswith((prefix + 'dictionaries.', prefix + 'mlp_dictionaries.')) for k in state_dict):
        return
    if prefix + 'blocks.0.attn.qkv.weight' in state_dict or prefix + 'blocks.0.attn.proj.weight' in state_dict:
        raise ValueError(
            "This state dict holds per-block attention weights (blocks.*.attn.qkv/proj.weight) and no shared "
            "dictionaries: it is a dense ViT checkpoint, not a MASA one. Convert it instead of loading it: "
            "masa_vit.from_dense(dense_model, ...) or timm.create_model('<masa model>', pretrained=True, "
            "pretrained_cfg_overlay=dict(file='<dense checkpoint>')), which converts while loading.")


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return getattr(model, 'module', model)  # DDP


@torch.no_grad()
def to_dense(model: MasaVisionTransformer) -> VisionTransformer:
    """Export a MASA model to a plain timm `VisionTransformer` with the composed weights (same outputs).

    The result's state dict loads into `timm.create_model('vit_...')` of the same shape.
    """
    model = _unwrap(model)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_dense expects a MASA VisionTransformer, got {type(model).__name__}.")
    ref = next(model.parameters())
    vit_kwargs = dict(getattr(model, '_vit_kwargs', {}), weight_init='skip')
    dense = VisionTransformer(**vit_kwargs).to(device=ref.device, dtype=ref.dtype)
    atom_params = set()
    for m in model.modules():
        if isinstance(m, AtomLinear):
            atom_params.update(id(p) for p in m.parameters() if p is not m.bias)
    for m in model.modules():
        if isinstance(m, AtomDictionary):
            atom_params.update(id(p) for p in m.parameters())
    state = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) not in atom_params:
            state[name] = p.detach()
    for name, m in model.named_modules():
        if isinstance(m, AtomLinear):
            state[f'{name}.weight'] = m._compose().detach()
        elif isinstance(m, GroupedQueryAttention):
            state[f'{name}.qkv.weight'], bias = m.dense_qkv()
            if bias is not None:
                state[f'{name}.qkv.bias'] = bias
    dense.load_state_dict(state, strict=True)
    dense.pretrained_cfg = copy.deepcopy(getattr(model, 'pretrained_cfg', {}))
    arch = DENSE_EQUIVALENT.get(dense.pretrained_cfg.get('architecture', ''))
    if arch is not None:
        dense.pretrained_cfg['architecture'] = arch
    dense.train(model.training)
    return dense


def _dense_equivalent(module: nn.Module) -> Tuple[int, int]:
    """(parameters kept, parameters of the dense equivalent) of an attention or MLP module."""
    if hasattr(module, 'dense_param_count'):
        return sum(p.numel() for p in module.parameters()), module.dense_param_count()
    if isinstance(module, AtomLinear):
        kept = sum(p.numel() for p in module.parameters())
        return kept, module.out_features * module.in_features + (module.bias.numel() if module.bias is not None else 0)
    kept = dense = sum(p.numel() for p in module.parameters(recurse=False))
    for child in module.children():
        k, d = _dense_equivalent(child)
        kept, dense = kept + k, dense + d
    return kept, dense


def count_params(model: nn.Module) -> Dict[str, Union[int, float]]:
    """Parameter counts every tool reports.

    Keys: total; attention (what attention keeps: per-block parameters, shared atoms, coefficients and coefficient
    MLPs, refinement terms), attention_dense (the dense twin's attention) and attention_compression
    (1 - attention / attention_dense); the same three for the MLPs (mlp, mlp_dense, mlp_compression).
    """
    model = _unwrap(model)
    counts = dict(total=sum(p.numel() for p in model.parameters()))
    for part, dict_attr in (('attention', 'dictionaries'), ('mlp', 'mlp_dictionaries')):
        kept = dense = 0
        for blk in getattr(model, 'blocks', []):
            k, d = _dense_equivalent(blk.attn if part == 'attention' else blk.mlp)
            kept, dense = kept + k, dense + d
        kept += sum(p.numel() for p in getattr(model, dict_attr, nn.ModuleList()).parameters())
        counts.update({part: kept, f'{part}_dense': dense, f'{part}_compression': 1.0 - kept / dense if dense else 0.0})
    return counts


@torch.no_grad()
def coefficient_matrices(model: nn.Module) -> List[Dict[str, Any]]:
    """The coefficient matrix C (blocks x atoms) of every shared projection, for inspection and logging.

    Returns a list of dicts: name (projection kind, e.g. 'q'), group, blocks (model block indices) and coef
    (float32 CPU tensor of shape (blocks in group, atoms)); 'fc1' / 'fc2' for shared MLPs. Empty for models without
    dictionaries.
    """
    model = _unwrap(model)
    out = []
    for g, (a, b) in enumerate(getattr(model, 'group_bounds', [])):
        found = []
        if g < len(getattr(model, 'dictionaries', [])):
            found.append(model.dictionaries[g])
        if g < len(getattr(model, 'mlp_dictionaries', [])):
            found.extend(model.mlp_dictionaries[g].values())
        for d in found:
            c = d.coefficients().detach().float().cpu()
            for i, kind in enumerate(d.kinds):
                out.append(dict(name=kind, group=g, blocks=list(range(a, b)), coef=c[i].clone()))
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MasaVisionTransformer) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: timm's ViT filter (pos embed / patch embed resizing, foreign layouts), then,
    when the checkpoint is a dense ViT and the model shares attention, the training-free conversion (Matrix PCA).
    Pure: returns a new dict and leaves `state_dict` untouched."""
    state_dict = vit_checkpoint_filter_fn(dict(state_dict), model)
    has_dictionaries = any(k.startswith('dictionaries.') for k in state_dict)
    if len(getattr(model, 'dictionaries', [])) and not has_dictionaries and 'blocks.0.attn.qkv.weight' in state_dict:
        # a dense ViT checkpoint: convert it (convert_state_dict raises a clear error when its shapes do not fit)
        from .conversion import convert_state_dict
        state_dict = convert_state_dict(state_dict, model)
    return state_dict


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


def _cfg_32(**kwargs) -> Dict[str, Any]:
    # CIFAR-100 statistics; 32 px inputs, no center crop
    return _cfg(
        num_classes=100, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear',
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), **kwargs)


def _cfg_from_dense(source: str, **kwargs) -> Dict[str, Any]:
    """A tag whose weights are a dense timm ViT checkpoint, converted to MASA while loading (Matrix PCA through
    `checkpoint_filter_fn`; no training). The hub id names the dense source: these are timm's dense weights."""
    return _cfg(
        hf_hub_id=f'timm/{source}',
        mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD,
        description=f'timm {source} converted on load to MASA by Matrix PCA (training-free); fine-tune before use.',
        **kwargs,
    )


# '.scratch*' (no weights) is the default tag (listed after the weighted tag: timm puts the last '*' tag first);
# the 'mpca_*' tags convert timm's dense weights while loading
default_cfgs = generate_default_cfgs({
    'masa_vit_tiny.mpca_augreg_in21k_ft_in1k': _cfg_from_dense('vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'masa_vit_tiny.scratch*': _cfg(),  # no weights: the default, for training from scratch
    'masa_vit_small.mpca_augreg_in21k_ft_in1k': _cfg_from_dense('vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'masa_vit_small.scratch*': _cfg(),  # no weights: the default, for training from scratch
    'masa_vit_base.mpca_augreg2_in21k_ft_in1k': _cfg_from_dense('vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'masa_vit_base.scratch*': _cfg(),  # no weights: the default, for training from scratch
    'masa_vit_large.mpca_augreg_in21k_ft_in1k': _cfg_from_dense('vit_large_patch16_224.augreg_in21k_ft_in1k'),
    'masa_vit_large.scratch*': _cfg(),  # no weights: the default, for training from scratch
    'masa_vit_nano_patch4_32': _cfg_32(),
    'masa_vit_micro_patch4_32': _cfg_32(),
    'masa_vit_microd_patch4_32': _cfg_32(),
})


def _create_masa_vit(variant: str, pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        MasaVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def masa_vit_tiny(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT-Tiny/16 @ 224 (shape of timm's vit_tiny_patch16_224), MASA-QKVO, S = 4 by default."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_masa_vit('masa_vit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_small(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT-Small/16 @ 224 (shape of timm's vit_small_patch16_224), MASA-QKVO, S = 4 by default."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_masa_vit('masa_vit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_base(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT-Base/16 @ 224 (shape of timm's vit_base_patch16_224), MASA-QKVO, S = 4 by default."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_masa_vit('masa_vit_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_large(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT-Large/16 @ 224 (shape of timm's vit_large_patch16_224), MASA-QKVO, S = 8 by default."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_masa_vit('masa_vit_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT @ 32 px, hidden 64, 12 blocks, 4 heads, MLP 256: the paper's small CIFAR/TinyImageNet shape."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.)
    return _create_masa_vit('masa_vit_nano_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_micro_patch4_32(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT @ 32 px, hidden 256, 12 blocks, 8 heads, MLP 1024: the paper's 4x-wide CIFAR shape."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=256, depth=12, num_heads=8, mlp_ratio=4.)
    return _create_masa_vit('masa_vit_micro_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def masa_vit_microd_patch4_32(pretrained: bool = False, **kwargs) -> MasaVisionTransformer:
    """ MASA ViT @ 32 px, hidden 256, 24 blocks, 8 heads, MLP 1024: the paper's deep CIFAR shape ('d' = deeper)."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=256, depth=24, num_heads=8, mlp_ratio=4.)
    return _create_masa_vit('masa_vit_microd_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))
