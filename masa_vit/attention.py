""" MASA attention projections.

MASA keeps timm's `Attention` module (fused SDPA, qk-norm, dropout) and swaps its two projections, `qkv` and `proj`,
for `AtomLinear` layers. An `AtomLinear` stacks its weight from parts (q, k, v for `qkv`; o for `proj`), each of
which is either

    * 'own':    a per-block weight, as in a dense ViT,
    * 'shared': composed from the group's `AtomDictionary` (W = sum_s c[l, s] D_s),
    * 'none':   no base weight (only the low-rank term below; the low-rank baseline),

optionally plus a per-block low-rank term U V (the local refinement of a converted model, or the low-rank baseline).
Biases always stay per block.

Training: in forward passes that autograd records, the dictionary composes the shared weights of all its blocks at
once and each layer takes its slice (`AtomDictionary.weight(..., batched=True)`).

Zero-overhead inference: in eval mode with gradients disabled, the composed weight is built once and reused until a
tensor it depends on changes (identity, version counter and storage of the tensors as looked up at each call, and the
count of optimizer steps), the layer returns to train mode, or `clear_cache()` is called. A MASA model's blocks
(`SharedWeightBlocks`) run that check once per forward pass for all layers, which then skip their own.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import trunc_normal_

from . import dictionary as _dictionary
from .dictionary import AtomDictionary

__all__ = ['AtomLinear', 'GroupedQueryAttention', 'PART_BASES']

PART_BASES = ('own', 'shared', 'none')

_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_fx_symbolic_tracing()


class AtomLinear(nn.Module):
    """Linear layer whose weight is stacked from per-block and dictionary-composed parts.

    Args:
        in_features: Input features.
        part_features: Output features of each part; the layer has `len(parts) * part_features` outputs.
        parts: Names of the parts in row order, e.g. ('q', 'k', 'v').
        bases: Base of each part: 'own', 'shared' or 'none'.
        bias: Add a per-block bias.
        dictionary: The group's dictionary, for 'shared' parts (held by reference, not registered: the dictionary is
            registered once on the model, so its tensors are stored once).
        block: Index of this block within the dictionary's group.
        lowrank: Rank of a per-block low-rank term U V per part name (0 or absent: none).
    """

    def __init__(
            self,
            in_features: int,
            part_features: int,
            parts: Sequence[str],
            bases: Sequence[str],
            bias: bool = True,
            dictionary: Optional[AtomDictionary] = None,
            block: int = 0,
            lowrank: Optional[Dict[str, int]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert len(parts) == len(bases), 'one base per part'
        lowrank = {k: int(r) for k, r in (lowrank or {}).items() if r and k in parts}
        for p, b in zip(parts, bases):
            if b not in PART_BASES:
                raise ValueError(f"part base must be one of {PART_BASES}, got {b!r}")
            if b == 'none' and not lowrank.get(p):
                raise ValueError(f"part {p!r} has no base weight and no low-rank term.")
            if b == 'shared' and (dictionary is None or p not in dictionary.kinds):
                raise ValueError(f"part {p!r} is shared but the dictionary does not hold it.")
        self.in_features = in_features
        self.part_features = part_features
        self.out_features = part_features * len(parts)
        self.parts = tuple(parts)
        self.bases = tuple(bases)
        self.block = block
        # held by reference only: registering it here would store the shared atoms once per block
        object.__setattr__(self, 'dictionary', dictionary)

        num_own = sum(b == 'own' for b in bases)
        self.weight = nn.Parameter(torch.empty(num_own * part_features, in_features, **dd)) if num_own else None
        self.bias = nn.Parameter(torch.zeros(self.out_features, **dd)) if bias else None
        self.lowrank = nn.ParameterDict()
        for p, r in lowrank.items():
            self.lowrank[f'{p}_u'] = nn.Parameter(torch.zeros(part_features, r, **dd))
            self.lowrank[f'{p}_v'] = nn.Parameter(torch.zeros(r, in_features, **dd))
        self.lowrank_ranks = dict(lowrank)
        self._segments = self._build_segments()
        for base, lo, hi, _ in self._segments:
            if base == 'shared':
                dictionary.register_use(block, lo, hi)
        self._has_own_deps = num_own > 0 or bool(lowrank)
        # eval cache: (state key, weight, the tensors the key names)
        self._cache: Optional[Tuple[tuple, torch.Tensor, List[torch.Tensor]]] = None
        # (box, index) from the SharedWeightBlocks holding this layer: during its eval pass box[0] is the list of
        # weights it validated for the pass, used without a check of their own; None outside the pass
        self._slot: Optional[Tuple[list, int]] = None
        self.init_weights()

    def _build_segments(self) -> List[tuple]:
        """Group consecutive parts that can be composed in one op: (base, lo, hi, lowrank part or None).

        For 'own', [lo, hi) are rows of `self.weight`; for 'shared', kind indices in the dictionary.
        """
        segments = []
        own_row = 0
        for p, b in zip(self.parts, self.bases):
            if b == 'own':
                lo, hi = own_row, own_row + self.part_features
                own_row = hi
            elif b == 'shared':
                lo = self.dictionary.kinds.index(p)
                hi = lo + 1
            else:
                lo = hi = 0
            lr = p if p in self.lowrank_ranks else None
            prev = segments[-1] if segments else None
            if lr is None and prev is not None and prev[3] is None and prev[0] == b and b != 'none' and prev[2] == lo:
                segments[-1] = (b, prev[1], hi, None)
            else:
                segments.append((b, lo, hi, lr))
        return segments

    def init_weights(self, std: float = 0.02) -> None:
        """timm's dense init: trunc_normal(std) weights, zero bias; low-rank terms start at zero over a base weight,
        or with a product of scale `std` when they are the only weight (low-rank baseline)."""
        if self.weight is not None:
            trunc_normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        for p, b in zip(self.parts, self.bases):
            if p not in self.lowrank_ranks:
                continue
            u, v = self.lowrank[f'{p}_u'], self.lowrank[f'{p}_v']
            if b == 'none':
                # (U V)_ij = sum_k U_ik V_kj has std r^0.5 * a * b = std for a = b = (std / r^0.5)^0.5
                # (plain normal: truncating each factor at 2 sigma would shrink the product's std by 0.88^2)
                a = (std / self.lowrank_ranks[p] ** 0.5) ** 0.5
                nn.init.normal_(u, std=a)
                nn.init.normal_(v, std=a)
            else:
                trunc_normal_(u, std=std)
                nn.init.zeros_(v)

    def _compose(self, batched: bool = False) -> torch.Tensor:
        # compose in the parameters' dtype, outside any autocast region: the result is the weight a dense layer would
        # hold, and F.linear casts it for autocast exactly as it casts a dense weight
        with torch.autocast(self._dependencies()[0].device.type, enabled=False):
            return self._compose_parts(batched)

    def _compose_parts(self, batched: bool = False) -> torch.Tensor:
        pieces = []
        for base, lo, hi, lr in self._segments:
            if base == 'own':
                w = self.weight[lo:hi]
            elif base == 'shared':
                # batched: in autograd-recorded forward passes, the dictionary composes all blocks at once
                w = self.dictionary.weight(self.block, lo, hi, batched=batched)
            else:
                w = None
            if lr is not None:
                delta = self.lowrank[f'{lr}_u'] @ self.lowrank[f'{lr}_v']
                w = delta if w is None else w + delta
            pieces.append(w)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def _own_dependencies(self) -> List[torch.Tensor]:
        """The block's own tensors the composed weight depends on: its unshared weight and low-rank terms (the bias is
        added by F.linear, not composed). Direct dict access: this runs on every cached eval call."""
        w = self._parameters.get('weight')
        deps = [] if w is None else [w]
        deps.extend(self.lowrank._parameters.values())
        return deps

    def _dependencies(self) -> List[torch.Tensor]:
        """Every tensor the composed weight depends on."""
        deps = self._own_dependencies()
        if self.dictionary is not None:
            deps.extend(self.dictionary._dependencies())
        return deps

    def _state_key(self, steps: int, dictionary_key: tuple) -> tuple:
        """What the cached weight is valid for: the optimizer step count and, for the tensors it depends on as they
        are looked up now (torch.func.functional_call swaps them), identity, version counter (in-place changes) and
        storage (.data = ..., device moves). The cache holds those tensors, so their ids cannot be reused."""
        if self._has_own_deps:
            return steps, dictionary_key, tuple((id(t), t._version, t.data_ptr()) for t in self._own_dependencies())
        return steps, dictionary_key

    def composed_weight(self) -> torch.Tensor:
        """The full (out, in) weight of this block, from the eval cache when that is valid."""
        return self._weight(_is_tracing())

    def _weight(self, tracing: bool) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or tracing:
            return self._compose(batched=not tracing)
        d = self.dictionary
        return self._eval_weight(self._state_key(
            _dictionary._optimizer_steps, d.state_key() if d is not None else ()))

    def _eval_weight(self, key: tuple) -> torch.Tensor:
        """The cached eval weight for state `key` (see `_state_key`), composed again when the state changed."""
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        weight = self._compose().contiguous()
        self._cache = (key, weight, self._dependencies())
        return weight

    @property
    def cached_weight(self) -> Optional[torch.Tensor]:
        """The eval-mode cached weight, or None when nothing is cached."""
        return self._cache[1] if self._cache is not None else None

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()  # device / dtype moves (parameters may be replaced, not only modified)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_cache'] = state['_slot'] = None  # never pickle or deep-copy cached weights
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self._slot
        if slot is not None:
            weights = slot[0][0]
            if weights is not None:  # inside an eval pass of SharedWeightBlocks, which validated the weights
                return F.linear(x, weights[slot[1]], self.bias)
        # _is_tracing() without its torch.fx check (~0.4 us): under fx symbolic tracing the input is a Proxy
        tracing = torch._C._is_tracing() or torch.compiler.is_compiling() or not isinstance(x, torch.Tensor)
        return F.linear(x, self._weight(tracing), self.bias)

    def extra_repr(self) -> str:
        parts = ', '.join(f'{p}:{b}' + (f'+r{self.lowrank_ranks[p]}' if p in self.lowrank_ranks else '')
                          for p, b in zip(self.parts, self.bases))
        return f'in_features={self.in_features}, out_features={self.out_features}, parts=[{parts}], block={self.block}'


class GroupedQueryAttention(nn.Module):
    """Multi-head self attention with fewer key/value heads than query heads (GQA baseline).

    Query heads are split into `num_kv_heads` groups; the heads of a group share one key and one value head.
    `qkv` projects to d + 2 * num_kv_heads * head_dim features (q, then k, then v).
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            num_kv_heads: int = 1,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[type] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (each key/value head serves a group "
                f"of query heads).")
        from timm.layers import use_fused_attn
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k = k.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
        v = v.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        rep = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(rep, dim=1)  # (B, H, N, hd): query head h uses kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def init_weights(self, std: float = 0.02) -> None:
        for lin in (self.qkv, self.proj):
            trunc_normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def dense_param_count(self) -> int:
        """Parameters of the multi-head attention with the same number of query heads."""
        d = self.proj.in_features
        n = sum(p.numel() for p in self.parameters())
        n += 2 * (d - self.kv_dim) * d  # the missing key/value rows
        if self.qkv.bias is not None:
            n += 2 * (d - self.kv_dim)
        return n

    @torch.no_grad()
    def dense_qkv(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The equivalent multi-head qkv weight and bias (key/value heads repeated for their query groups)."""
        d, rep = self.proj.in_features, self.num_heads // self.num_kv_heads

        def expand(t):  # (kv_dim, ...) -> (d, ...)
            return t.reshape(self.num_kv_heads, self.head_dim, *t.shape[1:]).repeat_interleave(rep, 0).reshape(
                d, *t.shape[1:])

        w = self.qkv.weight
        wq, wk, wv = w.split([d, self.kv_dim, self.kv_dim])
        weight = torch.cat([wq, expand(wk), expand(wv)])
        bias = None
        if self.qkv.bias is not None:
            bq, bk, bv = self.qkv.bias.split([d, self.kv_dim, self.kv_dim])
            bias = torch.cat([bq, expand(bk), expand(bv)])
        return weight, bias
