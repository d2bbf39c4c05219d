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
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import trunc_normal_

__all__ = ['AtomDictionary', 'COEF_MODES']

COEF_MODES = ('direct', 'mlp', 'select')


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

    def weight(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Compose the weights of kinds [start, stop) of `block`, stacked on rows: ((stop - start) * out, in)."""
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
