""" Matrix atom dictionary for MASA (Matrix Atom Sharing in Attention).

`Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning`
    - https://arxiv.org/abs/2508.04581 (Zhussip, Shopkhoev, Ali, Lefkimmiatis, AAAI 2026)

A group of L transformer blocks shares, per projection kind p (q, k, v, o), S matrix atoms D[p, s] of the full
weight shape (out, in). Block l rebuilds its weight as a linear combination of the atoms:

    W[p, l] = sum_s c[p, l, s] * D[p, s]

This module holds the atoms and the coefficients for one group of blocks, and nothing else. The blocks hold only
what is per block (biases, unshared weights) and ask the dictionary for their weight.

Coefficient parameterizations (`coef`):
    * 'direct': a trainable (P, L, S) coefficient tensor.
    * 'mlp': the paper's training-time parameterization: a trainable embedding per block mapped to the block's
      coefficients by a small MLP shared by all blocks of the group (an implicit regularizer). `fold()` replaces it
      by the fixed coefficient tensor it produces, so that inference has no extra cost.
    * 'select': no coefficients: block l uses atom `assign[l]` alone (sequential / cycle weight sharing baselines).

Batched composition: in forward passes that autograd records, `weight(..., batched=True)` composes the weights of all
blocks at once (one GEMM per kind) and hands each block a contiguous slice, so that the backward pass accumulates the
atoms' gradient once per kind instead of once per block (see `AtomDictionary.weight`).
"""
import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import trunc_normal_
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ['AtomDictionary', 'COEF_MODES']

COEF_MODES = ('direct', 'mlp', 'select')

# Optimizer steps counted process-wide: fused optimizers (e.g. AdamW(fused=True)) update parameters without bumping
# their version counters, so the weight caches (here and in AtomLinear's eval cache) also key on this count.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _ComposeBlockMajor(torch.autograd.Function):
    """W[l, p] = C[p, l] @ A[p] for every block l and kind p, written block-major: (L, P, out * in).

    Block-major rows make every block's weights one contiguous slice of the result. The backward is one GEMM per kind
    for the atoms and one for the coefficients, however many blocks there are.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:  # (P, L, S), (P, S, out * in)
        num_kinds, num_blocks, _ = coef.shape
        out = atoms.new_empty(num_blocks, num_kinds, atoms.shape[-1])
        for p in range(num_kinds):
            torch.mm(coef[p], atoms[p], out=out[:, p])
        ctx.save_for_backward(coef, atoms)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coef, atoms = ctx.saved_tensors
        kinds = range(coef.shape[0])
        grad_coef = grad_atoms = None
        if ctx.needs_input_grad[0]:
            grad_coef = torch.stack([grad[:, p] @ atoms[p].T for p in kinds])
        if ctx.needs_input_grad[1]:
            grad_atoms = torch.stack([coef[p].T @ grad[:, p] for p in kinds])
        return grad_coef, grad_atoms


def _identity(t):
    return t


def _release_composed(ref: 'weakref.ref', token: object) -> None:
    """Backward went through a batched composition: its graph is spent, so the next forward composes again."""
    d = ref()
    if d is not None and d._composed is not None and d._composed[-1] is token:
        d._composed = None


class CoefficientMlp(nn.Module):
    """Per-block embeddings mapped to dictionary coefficients by a shared 3-layer MLP."""

    def __init__(
            self,
            num_blocks: int,
            num_outputs: int,
            embed_dim: int = 64,
            hidden_dim: int = 64,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.embed = nn.Parameter(torch.empty(num_blocks, embed_dim, **dd))
        self.fc1 = nn.Linear(embed_dim, hidden_dim, **dd)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim, **dd)
        self.fc3 = nn.Linear(hidden_dim, num_outputs, **dd)
        self.act = nn.GELU()

    def forward(self) -> torch.Tensor:
        x = self.act(self.fc1(self.embed))
        x = self.act(self.fc2(x))
        return self.fc3(x)  # (L, P * S)


class AtomDictionary(nn.Module):
    """Shared matrix atoms and per-block coefficients of one group of blocks.

    Args:
        kinds: The projection kinds this dictionary serves, e.g. ('q', 'k', 'v', 'o'), in the order the blocks ask
            for them (kinds a block asks for together must be consecutive here).
        num_blocks: Number of blocks L in the group.
        num_atoms: Number of atoms S per kind (or in total for a common dictionary).
        out_features: Rows of each weight matrix.
        in_features: Columns of each weight matrix.
        common: One atom set for all kinds (the paper's ablation) instead of one per kind.
        coef: Coefficient parameterization, one of 'direct', 'mlp', 'select'.
        assign: For coef='select', the atom index used by each block.
        coef_embed_dim: Embedding width for coef='mlp'.
        coef_hidden_dim: Hidden width for coef='mlp'.
    """

    batched_compose: bool = True  # compose all blocks at once in training (see `weight`); False: block by block

    def __init__(
            self,
            kinds: Sequence[str],
            num_blocks: int,
            num_atoms: int,
            out_features: int,
            in_features: int,
            common: bool = False,
            coef: str = 'direct',
            assign: Optional[Sequence[int]] = None,
            coef_embed_dim: int = 64,
            coef_hidden_dim: int = 64,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if coef not in COEF_MODES:
            raise ValueError(f"coef must be one of {COEF_MODES}, got {coef!r}.")
        if not 1 <= num_atoms:
            raise ValueError(f"num_atoms must be >= 1, got {num_atoms}.")
        self.kinds = tuple(kinds)
        self.num_kinds = len(self.kinds)
        self.num_blocks = num_blocks
        self.num_atoms = num_atoms
        self.out_features = out_features
        self.in_features = in_features
        self.common = common
        self.coef_mode = coef
        self._uses = set()  # (block, start, stop) requested by the blocks' layers (see `weight`)
        self._composed = None

        num_sets = 1 if common else self.num_kinds
        self.atoms = nn.Parameter(torch.empty(num_sets, num_atoms, out_features, in_features, **dd))
        if coef == 'direct':
            self.coef = nn.Parameter(torch.empty(self.num_kinds, num_blocks, num_atoms, **dd))
        elif coef == 'mlp':
            self.coef_mlp = CoefficientMlp(
                num_blocks, self.num_kinds * num_atoms, embed_dim=coef_embed_dim, hidden_dim=coef_hidden_dim, **dd)
        else:
            if common:
                raise ValueError("coef='select' (sequential/cycle sharing) needs a separate dictionary per kind.")
            assign = list(assign) if assign is not None else [l % num_atoms for l in range(num_blocks)]
            if len(assign) != num_blocks or not all(0 <= a < num_atoms for a in assign):
                raise ValueError(f"assign must give an atom index in [0, {num_atoms}) for each of {num_blocks} blocks.")
            self.assign = tuple(assign)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Initialize so that every composed weight has the scale of timm's dense init (trunc_normal, std).

        Atoms are i.i.d. N(0, std^2); each block's coefficient row is a random unit vector, so the composed weight
        W = sum_s c_s D_s has i.i.d. N(0, std^2 * |c|^2) = N(0, std^2) entries, and blocks differ.
        Called by timm's `init_weights` (it calls `init_weights()` on modules that have one).
        """
        trunc_normal_(self.atoms, std=std)
        with torch.no_grad():
            if self.coef_mode == 'select':
                return
            c = torch.randn(self.num_kinds, self.num_blocks, self.num_atoms, device=self.atoms.device)
            c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            if self.coef_mode == 'direct':
                self.coef.copy_(c)
                return
            # 'mlp': random embeddings and hidden layers; the last layer is solved by least squares so that the MLP
            # starts out producing the same unit-norm coefficient rows as the 'direct' init
            mlp = self.coef_mlp
            nn.init.normal_(mlp.embed, std=1.0)
            for fc in (mlp.fc1, mlp.fc2, mlp.fc3):
                nn.init.kaiming_normal_(fc.weight, nonlinearity='linear')
                nn.init.zeros_(fc.bias)
            h = mlp.act(mlp.fc2(mlp.act(mlp.fc1(mlp.embed)))).double()  # (L, hidden)
            target = c.transpose(0, 1).reshape(self.num_blocks, -1).double()  # (L, P * S)
            mlp.fc3.weight.copy_((torch.linalg.pinv(h) @ target).T.to(mlp.fc3.weight))

    def coefficients(self) -> torch.Tensor:
        """The coefficient tensor C of shape (P, L, S) (one-hot rows for coef='select')."""
        if self.coef_mode == 'direct':
            return self.coef
        if self.coef_mode == 'mlp':
            c = self.coef_mlp().view(self.num_blocks, self.num_kinds, self.num_atoms)
            return c.transpose(0, 1)
        assign = torch.tensor(self.assign, device=self.atoms.device)
        onehot = F.one_hot(assign, self.num_atoms).to(self.atoms.dtype)
        return onehot.unsqueeze(0).expand(self.num_kinds, -1, -1)

    def register_use(self, block: int, start: int, stop: int) -> None:
        """Declare that a layer asks for kinds [start, stop) of `block` (called by the layers that use the atoms).

        When the declared uses tile every (block, kind) exactly once, `weight(..., batched=True)` composes all blocks
        at once.
        """
        self._uses.add((block, start, stop))
        self._composed = None

    def _split_plan(self) -> Optional[List[Tuple[int, int, int]]]:
        """The declared uses in block-major row order, if they tile the (L * P) composed rows exactly once."""
        uses = sorted(self._uses, key=lambda u: (u[0] * self.num_kinds + u[1], u[2]))
        row = 0
        for block, start, stop in uses:
            if block * self.num_kinds + start != row or not start < stop <= self.num_kinds:
                return None
            row += stop - start
        return uses if row == self.num_blocks * self.num_kinds else None

    def _dependencies(self) -> List[torch.Tensor]:
        deps = list(self._parameters.values())
        mlp = self._modules.get('coef_mlp')
        if mlp is not None:
            deps.extend(mlp.parameters())
        return deps

    def state_key(self) -> tuple:
        """Identity, version counter and storage of every tensor the composed weights depend on, as looked up now:
        equal keys mean unchanged weights (the eval caches of the blocks compare it)."""
        return tuple((id(t), t._version, t.data_ptr()) for t in self._dependencies())

    def _compose_all(self) -> Optional[Dict[Tuple[int, int, int], torch.Tensor]]:
        """Every declared use's weight from one batched composition, reused until the weights change.

        Valid while no optimizer stepped, no dependency was modified in place, swapped or had its requires_grad
        changed, and no backward pass went through it (its graph is then spent). Non-reentrant gradient checkpointing
        re-runs the blocks inside the backward pass and gets the same tensors back, so nothing is composed twice.
        """
        cached = self._composed
        deps = self._dependencies()  # looked up again: torch.func.functional_call swaps the parameters themselves
        if cached is not None:
            cached_deps, steps, key, composed, _ = cached
            if steps == _optimizer_steps and len(deps) == len(cached_deps) and all(
                    t is c and t._version == v and t.data_ptr() == p and t.requires_grad == g
                    for t, c, (v, p, g) in zip(deps, cached_deps, key)):
                return composed
            self._composed = None
        plan = self._split_plan()
        if plan is None:
            return None
        # The first block composes for all, possibly inside a non-reentrant checkpointed region whose recomputation
        # will not compose again: identity saved-tensor hooks keep this composition's saved tensors out of the
        # checkpoint's bookkeeping (it would find a different number of tensors saved in the recomputation).
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            coef = self.coefficients()
            if self.common:
                w = torch.matmul(coef.transpose(0, 1), self.atoms[0].flatten(1))  # (L, P, S) @ (S, out * in)
            else:
                w = _ComposeBlockMajor.apply(coef, self.atoms.flatten(2))  # (L, P, out * in)
        rows = w.view(self.num_blocks * self.num_kinds, -1).split([stop - start for _, start, stop in plan])
        composed = {
            use: r.view((use[2] - use[1]) * self.out_features, self.in_features) for use, r in zip(plan, rows)}
        token = object()  # the hook must not hold the composed tensors (a cycle through them would delay their release)
        if w.requires_grad:
            w.register_hook(lambda grad, ref=weakref.ref(self), t=token: _release_composed(ref, t))
        key = [(t._version, t.data_ptr(), t.requires_grad) for t in deps]
        self._composed = (deps, _optimizer_steps, key, composed, token)
        return composed

    def clear_cache(self) -> None:
        self._composed = None

    def train(self, mode: bool = True):
        self._composed = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._composed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._composed = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_composed'] = None  # never pickle or deep-copy composed weights (non-leaf tensors of a graph)
        return state

    def weight(self, block: int, start: int, stop: int, batched: bool = False) -> torch.Tensor:
        """Compose the weights of kinds [start, stop) of `block`, stacked on rows: ((stop - start) * out, in).

        With `batched` (layers pass it in autograd-recorded forward passes, not under tracing or compiling), the
        weights of all blocks are composed at once and each block gets its contiguous slice: the backward pass then
        accumulates the atoms' gradient in one GEMM per kind instead of once per block.
        """
        if batched and self.batched_compose and self.coef_mode != 'select' and torch.is_grad_enabled():
            composed = self._compose_all()
            if composed is not None:
                w = composed.get((block, start, stop))
                if w is not None:
                    return w
        n = stop - start
        if self.coef_mode == 'select':
            a = self.assign[block]
            w = self.atoms[start:stop, a]  # (n, out, in), a view
            return w.reshape(n * self.out_features, self.in_features)
        c = self.coefficients()[start:stop, block]  # (n, S)
        if self.common:
            w = c @ self.atoms[0].flatten(1)  # (n, S) @ (S, out * in)
        else:
            w = torch.bmm(c.unsqueeze(1), self.atoms[start:stop].flatten(2)).squeeze(1)  # (n, out * in)
        return w.view(n * self.out_features, self.in_features)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the coefficient MLP by the fixed coefficient tensor it produces (coef 'mlp' -> 'direct')."""
        if self.coef_mode != 'mlp':
            return
        c = self.coefficients().detach().clone()
        del self.coef_mlp
        self.coef = nn.Parameter(c)
        self.coef_mode = 'direct'

    def extra_repr(self) -> str:
        return (
            f"kinds={''.join(self.kinds)}, blocks={self.num_blocks}, atoms={self.num_atoms}, "
            f"shape=({self.out_features}, {self.in_features}), common={self.common}, coef={self.coef_mode}"
        )
