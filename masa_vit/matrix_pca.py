""" Matrix PCA and data-aware low-rank tools for training-free MASA conversion.

Pure math on tensors, no model code. Implements the training-free path of
"Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning"
(Zhussip et al., AAAI 2026, https://arxiv.org/abs/2508.04581), section "Pretrained models":

* Matrix PCA: S orthonormal matrix atoms for a stack of L layer weights, in closed form through
  the L x L Gram matrix (float64 + eigh, eigenvalues floored before dividing by sqrt(lambda)).
* Grouping: KL divergence between the class distributions of consecutive layers, cut where it is large.
* Local refinement: the residual W - W^ is whitened with the Cholesky factor of the layer input
  autocorrelation X^T X and approximated at low rank (the SVD-LLM construction,
  https://arxiv.org/abs/2403.07378); plain and whitened truncated SVD of a full weight are the baselines.
* Adaptive rank allocation across projection roles (Q/K/V/O) under a parameter budget.
* Joint refinement: block coordinate descent on atoms, coefficients and low-rank terms together, on the
  whitened (output) objective, starting from Matrix PCA + whitened low rank.
* Sequential refit of one layer on the converted model's inputs, towards the dense outputs
  (error-correcting target W X^T Xc (Xc^T Xc)^{-1}), atoms fixed.

Notation: a layer computes y = x W^T with W of shape (out, in) and x of shape (tokens, in), so the
output error of an approximation W^ on calibration tokens X is ||(W - W^) X^T||_F and
||(W - W^) X^T||_F^2 = ||(W - W^) L||_F^2 for X^T X = L L^T.
"""
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'matrix_pca', 'matrix_pca_common', 'matrix_pca_spectrum',
    'layer_kl_drift', 'kl_group_starts',
    'input_autocorrelation', 'cholesky_factor', 'whitened_lowrank', 'truncated_svd', 'whitened_svd',
    'whitened_residual_spectrum', 'allocate_ranks', 'joint_refine', 'error_correcting_target', 'refit_coef_lowrank',
]

_logger = logging.getLogger(__name__)
_EXTRAPOLATION_MAX = 1.0  # cap of joint_refine's extrapolation step (1.0 as in Ang & Gillis 2019)


# ---------------------------------------------------------------------------------------------------
# Matrix PCA
# ---------------------------------------------------------------------------------------------------

def matrix_pca_spectrum(weights: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64) of the L x L Gram matrix of a weight stack.

    The squared Frobenius reconstruction error of Matrix PCA with S atoms is the sum of the eigenvalues
    after the first S, and the total is sum_l ||W_l||_F^2.

    Args:
        weights: (L, out, in) stack of layer weights.
    """
    m = weights.detach().reshape(weights.shape[0], -1).to(torch.float64)  # (L, out*in)
    gram = m @ m.T  # (L, L)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.)


def matrix_pca(
        weights: torch.Tensor,
        num_atoms: int,
        eig_floor: float = 1e-12,
        return_eigvals: bool = False,
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Closed-form Matrix PCA of a stack of layer weights.

    Finds S atoms D_s (orthonormal in the trace inner product, tr(D_i^T D_j) = delta_ij) and coefficients
    c_{l,s} = tr(D_s^T W_l) minimizing sum_l ||W_l - sum_s c_{l,s} D_s||_F^2. With M = [vec(W_1) ... vec(W_L)]^T
    (L, out*in) and the Gram matrix G = M M^T = V diag(lambda) V^T, the atoms are D_s = M^T v_s / sqrt(lambda_s)
    for the S largest eigenvalues and the coefficients are c_{l,s} = sqrt(lambda_s) v_{l,s}. The L x L problem
    costs O(L^2 out in), much less than an SVD of M. Computed in float64 (a float32 Gram squares the condition
    number), returned in the input dtype.

    Args:
        weights: (L, out, in) stack of layer weights of one projection kind in one group.
        num_atoms: S, 1 <= S <= L.
        eig_floor: eigenvalues are floored at eig_floor * lambda_max (and at the smallest positive float64)
            before dividing by sqrt(lambda); atoms of floored eigenvalues are not unit norm (there is nothing
            left to represent), which is logged.
        return_eigvals: also return all L eigenvalues (descending, float64).

    Returns:
        atoms (S, out, in), coef (L, S) and optionally eigvals (L,).
    """
    if weights.ndim != 3:
        raise ValueError(f'matrix_pca expects weights of shape (L, out, in), got {tuple(weights.shape)}')
    num_layers = weights.shape[0]
    if not 1 <= num_atoms <= num_layers:
        raise ValueError(
            f'num_atoms must be between 1 and the number of layers in the group ({num_layers}), got {num_atoms}')
    m = weights.detach().reshape(num_layers, -1).to(torch.float64)  # (L, out*in)
    gram = m @ m.T  # (L, L)
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0.), eigvecs.flip(1)
    lam = eigvals[:num_atoms]
    floor = max(eig_floor * float(eigvals[0]), torch.finfo(torch.float64).tiny)
    if bool((lam < floor).any()):
        _logger.warning(
            'matrix_pca: %d of %d requested atoms have eigenvalue below %.3g (the stack has numerical rank < S); '
            'their atoms carry no energy', int((lam < floor).sum()), num_atoms, floor)
    vecs = eigvecs[:, :num_atoms]  # (L, S)
    atoms = (vecs.T @ m) / lam.clamp_min(floor).sqrt()[:, None]  # (S, out*in)
    coef = m @ atoms.T  # (L, S), c_{l,s} = tr(D_s^T W_l)
    atoms = atoms.reshape(num_atoms, *weights.shape[1:]).to(weights.dtype)
    coef = coef.to(weights.dtype)
    if return_eigvals:
        return atoms, coef, eigvals
    return atoms, coef


def matrix_pca_common(
        weights: Sequence[torch.Tensor],
        num_atoms: int,
        eig_floor: float = 1e-12,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Matrix PCA with one dictionary shared by several projection kinds.

    The kinds' stacks become more rows of the same Gram problem: P stacks of (L, out, in) give a (P*L, out*in)
    matrix whose S principal matrix directions are the common atoms.

    Args:
        weights: P stacks of shape (L, out, in) (e.g. Q, K, V, O of one group), all of the same shape.
        num_atoms: S, 1 <= S <= P*L.

    Returns:
        atoms (S, out, in), coef (P, L, S).
    """
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f'a common dictionary needs stacks of one shape, got {sorted(shapes)}')
    stacked = torch.stack(list(weights))  # (P, L, out, in)
    num_kinds, num_layers = stacked.shape[:2]
    atoms, coef = matrix_pca(stacked.reshape(num_kinds * num_layers, *stacked.shape[2:]), num_atoms, eig_floor)
    return atoms, coef.reshape(num_kinds, num_layers, num_atoms)


# ---------------------------------------------------------------------------------------------------
# Grouping by KL drift
# ---------------------------------------------------------------------------------------------------

def layer_kl_drift(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Mean KL divergence KL(p_i || p_{i+1}) between the class distributions of consecutive layers.

    Args:
        logits: (E, N, C) (or E tensors of (N, C)): per layer (entry) the logits of N calibration samples.

    Returns:
        drift (E - 1,) in float64, drift[i] = mean_n KL(softmax(logits[i, n]) || softmax(logits[i + 1, n])).
    """
    if not isinstance(logits, torch.Tensor):
        logits = torch.stack(list(logits))
    if logits.ndim != 3 or logits.shape[0] < 2:
        raise ValueError(f'expected logits of shape (entries >= 2, N, C), got {tuple(logits.shape)}')
    logp = torch.log_softmax(logits.detach().to(torch.float64), dim=-1)
    p = logp.exp()
    kl = (p[:-1] * (logp[:-1] - logp[1:])).sum(-1)  # (E-1, N)
    return kl.mean(-1)


def kl_group_starts(
        drift: torch.Tensor,
        num_blocks: int,
        num_groups: Optional[int] = None,
        threshold: Optional[float] = None,
        min_group_size: int = 1,
) -> List[int]:
    """Cut a stack of blocks into contiguous groups where the layer-to-layer drift is largest.

    Cutting at the largest drifts minimizes the total drift left inside the groups. ``drift`` comes from
    ``layer_kl_drift`` over either L + 1 entries (the stem output, then each block's output: drift[b] is the
    change made by block b) or L entries (each block's output: drift[b - 1] is the change made by block b).
    A cut before block b (b >= 1) starts a new group there.

    Args:
        drift: (L,) or (L - 1,) drift values.
        num_blocks: L.
        num_groups: number of groups wanted (exact search for the num_groups - 1 admissible cuts of largest
            summed drift).
        threshold: alternatively, cut before every block whose drift exceeds it.
        min_group_size: smallest allowed group.

    Returns:
        sorted group start indices, starting with 0.
    """
    if (num_groups is None) == (threshold is None):
        raise ValueError('give exactly one of num_groups and threshold')
    drift = torch.as_tensor(drift, dtype=torch.float64).flatten()
    if drift.numel() == num_blocks:
        block_drift = {b: float(drift[b]) for b in range(1, num_blocks)}
    elif drift.numel() == num_blocks - 1:
        block_drift = {b: float(drift[b - 1]) for b in range(1, num_blocks)}
    else:
        raise ValueError(f'drift has {drift.numel()} entries, expected {num_blocks} or {num_blocks - 1}')
    if num_groups is not None and not 1 <= num_groups <= num_blocks // max(min_group_size, 1):
        raise ValueError(
            f'cannot cut {num_blocks} blocks into {num_groups} groups of at least {min_group_size} blocks')

    if threshold is not None:
        starts = [0]
        for b in sorted(block_drift, key=lambda i: (-block_drift[i], i)):
            if block_drift[b] <= threshold:
                break
            cand = sorted(starts + [b])
            sizes = [e - s for s, e in zip(cand, cand[1:] + [num_blocks])]
            if min(sizes) >= min_group_size:
                starts = cand
        return starts

    # exact: choose num_groups - 1 cuts maximizing the summed drift at the cuts, groups >= min_group_size.
    # best[k][e] = (score, starts) for k groups covering blocks [0, e)
    best = [dict() for _ in range(num_groups + 1)]
    best[0][0] = (0.0, [])
    for k in range(1, num_groups + 1):
        for e in range(k * min_group_size, num_blocks + 1):
            cands = []
            for s, (score, starts) in best[k - 1].items():
                if e - s >= min_group_size:
                    cands.append((score + block_drift.get(s, 0.0), starts + [s]))
            if cands:
                best[k][e] = max(cands, key=lambda c: (c[0], [-i for i in c[1]]))
    if num_blocks not in best[num_groups]:
        raise ValueError(f'could not find {num_groups} groups with at least {min_group_size} blocks each')
    starts = best[num_groups][num_blocks][1]
    return starts


# ---------------------------------------------------------------------------------------------------
# Whitening and low rank
# ---------------------------------------------------------------------------------------------------

def input_autocorrelation(x: torch.Tensor) -> torch.Tensor:
    """X^T X (in, in) in float64 for layer inputs x of shape (..., in)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    return x.T @ x


def cholesky_factor(xtx: torch.Tensor, damping: float = 1e-2, max_tries: int = 6, ridge: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor L of X^T X + ridge * mean(diag) I (L L^T = X^T X + ...), float64.

    The small ridge bounds L^-1: the input of a layer after LayerNorm has a (near-)null direction (each token's
    normalized features sum to zero), so X^T X can be positive definite in float64 with a condition number of 1e15,
    and a whitened fit W^ = (W L)_r L^-1 then puts weights of 1e4 along that direction, which the calibration tokens
    do not see but rounding does (measured on the test ViT: a sequential conversion with weights up to 2e4 whose
    logits moved by 0.04 under a 1e-6 relative perturbation of its parameters; with the ridge: weights below 10,
    the same calibration error, and 2e-6). When X^T X + ridge is still not numerically positive definite (e.g.
    fewer tokens than features) ``damping * mean(diag)`` is added to the diagonal, ten times more on each further
    failure.
    """
    xtx = xtx.to(torch.float64)
    xtx = 0.5 * (xtx + xtx.T)
    if ridge:
        xtx = xtx + ridge * float(xtx.diagonal().mean().clamp_min(0)) * torch.eye(
            xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    factor, info = torch.linalg.cholesky_ex(xtx)
    if int(info) == 0:
        return factor
    mean_diag = float(xtx.diagonal().mean())
    if mean_diag <= 0:
        raise ValueError('input autocorrelation is zero; no calibration tokens reached this layer')
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    for i in range(max_tries):
        lam = damping * 10 ** i * mean_diag
        factor, info = torch.linalg.cholesky_ex(xtx + lam * eye)
        if int(info) == 0:
            _logger.debug('cholesky_factor: added %.3g (%.0e x mean diag) to the diagonal', lam, damping * 10 ** i)
            return factor
    raise RuntimeError(f'Cholesky of the input autocorrelation failed even with damping {damping * 10 ** max_tries}')


def _split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # balanced split of the singular values: (out, r) and (r, in) of similar scale, friendly to fine-tuning
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of a (out, in) matrix in the Frobenius norm: weight ~= U @ V.

    Returns U (out, r), V (r, in) in the input dtype (computed in float64).
    """
    w = weight.detach().to(torch.float64)
    _check_rank(rank, w)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    uf, vf = _split_factors(u, s, vh, rank)
    return uf.to(weight.dtype), vf.to(weight.dtype)


def whitened_lowrank(
        residual: torch.Tensor,
        xtx: Optional[torch.Tensor],
        rank: int,
        chol: Optional[torch.Tensor] = None,
        damping: float = 1e-2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Data-aware rank-r approximation of a (out, in) matrix: minimizes ||(R - U V) X^T||_F.

    With X^T X = L L^T, ||(R - UV) X^T||_F = ||(R - UV) L||_F, so the truncated SVD of R L, mapped back through
    L^{-1} (a triangular solve), is optimal (SVD-LLM, Wang et al. 2024). Give ``xtx`` or a precomputed ``chol``.

    Returns U (out, r), V (r, in) in the input dtype, R ~= U @ V.
    """
    r = residual.detach().to(torch.float64)
    _check_rank(rank, r)
    if chol is None:
        if xtx is None:
            raise ValueError('whitened_lowrank needs xtx or chol')
        chol = cholesky_factor(xtx, damping)
    chol = chol.to(torch.float64)
    u, s, vh = torch.linalg.svd(r @ chol, full_matrices=False)
    uf, vf = _split_factors(u, s, vh, rank)
    # V = vf L^{-1}  <=>  V L = vf  <=>  L^T V^T = vf^T
    vf = torch.linalg.solve_triangular(chol.T, vf.T, upper=True).T
    return uf.to(residual.dtype), vf.to(residual.dtype)


def whitened_svd(
        weight: torch.Tensor, xtx: torch.Tensor, rank: int, chol: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM baseline: data-aware rank-r factorization of a full weight (see ``whitened_lowrank``)."""
    return whitened_lowrank(weight, xtx, rank, chol=chol)


def whitened_residual_spectrum(residual: torch.Tensor, chol: Optional[torch.Tensor]) -> torch.Tensor:
    """Singular values (float64, descending) of R L (or of R when chol is None): the squared tail sums are the
    output error energies left by whitened low-rank approximations of each rank."""
    r = residual.detach().to(torch.float64)
    if chol is not None:
        r = r @ chol.to(torch.float64)
    return torch.linalg.svdvals(r)


def _check_rank(rank: int, mat: torch.Tensor):
    if not 1 <= rank <= min(mat.shape):
        raise ValueError(f'rank must be between 1 and {min(mat.shape)} for a {tuple(mat.shape)} matrix, got {rank}')


# ---------------------------------------------------------------------------------------------------
# Adaptive rank allocation across roles
# ---------------------------------------------------------------------------------------------------

def allocate_ranks(
        spectra: Mapping[str, torch.Tensor],
        budget: int,
        cost_per_rank: Mapping[str, int],
        step: int = 1,
        normalize: Optional[Mapping[str, float]] = None,
        max_rank: Optional[Mapping[str, int]] = None,
) -> Dict[str, int]:
    """Greedy rank allocation across projection roles under a parameter budget.

    Every role gets one rank for all its blocks. Starting from zero, ``step`` rank units at a time go to the role
    whose next units remove the most (normalized) whitened residual energy per parameter, while the budget
    allows. For singular values that decrease with rank the marginal gains decrease too, so greedy allocation is
    optimal for whole steps.

    Args:
        spectra: role -> (num_blocks, k) singular values of the whitened residuals (``whitened_residual_spectrum``),
            one row per block of the role.
        budget: parameters available for the low-rank terms, all roles and blocks together.
        cost_per_rank: role -> parameters one rank unit costs over all the role's blocks
            (num_blocks * (out + in)).
        step: rank granularity.
        normalize: role -> divisor of its energies (e.g. the whitened energy of the dense weights, so that roles
            are compared by relative output error); None compares raw energies.
        max_rank: role -> cap.

    Returns:
        role -> rank (0 where the role gets none).
    """
    if step < 1:
        raise ValueError(f'step must be >= 1, got {step}')
    energy = {}
    for role, sv in spectra.items():
        sv = torch.as_tensor(sv, dtype=torch.float64)
        if sv.ndim == 1:
            sv = sv[None]
        e = (sv ** 2).sum(0)  # (k,) energy of the i-th singular direction summed over blocks
        if normalize is not None:
            e = e / max(float(normalize[role]), torch.finfo(torch.float64).tiny)
        energy[role] = e
    ranks = {role: 0 for role in spectra}
    used = 0
    while True:
        best, best_gain = None, -math.inf
        for role, e in energy.items():
            cap = min(e.numel(), max_rank[role] if max_rank and role in max_rank else e.numel())
            k = ranks[role]
            n = min(step, cap - k)
            if n <= 0 or used + n * cost_per_rank[role] > budget:
                continue
            gain = float(e[k:k + n].sum()) / (n * cost_per_rank[role])
            if gain > best_gain:
                best, best_gain = role, gain
        if best is None:
            break
        n = min(step, energy[best].numel() - ranks[best])
        if max_rank and best in max_rank:
            n = min(n, max_rank[best] - ranks[best])
        ranks[best] += n
        used += n * cost_per_rank[best]
    return ranks



# ---------------------------------------------------------------------------------------------------
# Joint data-aware refinement (block coordinate descent)
# ---------------------------------------------------------------------------------------------------

def _whitened_objective(weights, atoms, coef, lowrank, chols) -> torch.Tensor:
    """Per item ||(W_n - sum_s c_ns D_s - U_n V_n) R_n||_F^2, (N,) float64."""
    err = weights - torch.einsum('ns,soi->noi', coef, atoms) - lowrank
    return torch.stack([(e @ r).square().sum() for e, r in zip(err, chols)])


def joint_refine(
        weights: torch.Tensor,
        atoms: torch.Tensor,
        coef: torch.Tensor,
        chols: Union[torch.Tensor, Sequence[torch.Tensor]],
        ranks: Sequence[int],
        iters: int,
        damping: float = 1e-10,
        tol: float = 0.0,
        check_tol: float = 1e-8,
        extrapolate: bool = True,
        method: str = 'bcd',
        lbfgs_chunk: int = 10,
) -> Dict[str, Any]:
    """Data-aware joint refinement of shared atoms, coefficients and per-item low-rank terms.

    Minimizes J = sum_n ||(W_n - sum_s c_ns D_s - U_n V_n) R_n||_F^2 (R_n R_n^T = Sigma_n, the input
    autocorrelation of item n, so each term is the output error of layer n on the calibration tokens) by block
    coordinate descent, each step an exact minimization over one block of variables given the others:

    (a) U_n V_n: whitened truncated SVD of W_n - sum_s c_ns D_s at rank r_n (``whitened_lowrank``);
    (b) c_n: the S x S least-squares problem A c_n = b, A_st = tr(D_s Sigma_n D_t^T), b_s = tr(D_s Sigma_n E_n^T),
        E_n = W_n - U_n V_n (minimum-norm solution through a pseudo-inverse);
    (c) D_s, one atom at a time: D_s H = B with H = sum_n c_ns^2 Sigma_n and
        B = sum_n c_ns (E_n - sum_{t != s} c_nt D_t) Sigma_n (Cholesky solve of the (in, in) matrix H; when H is
        numerically singular ``damping * mean(diag H)`` is added, ten times more on each failure, and a damped
        update that would raise J is not taken).

    method='lbfgs' instead minimizes f(D, C) = min_{U, V} J (the low rank always optimal, step (a)) with L-BFGS
    (strong Wolfe line search): by the envelope theorem the gradient of f is that of J with U V held fixed, so
    each evaluation is step (a) plus one backward pass. It converges far faster than the sweeps (on the digits
    ViT's weights BCD was still descending after 300 sweeps where L-BFGS had levelled off at a 20-40% lower J).
    ``iters`` then counts L-BFGS iterations, run in chunks of ``lbfgs_chunk``; J is recorded after each chunk, the
    run stops when a chunk does not lower it, and the best point is kept, so J never increases here either.

    The start is the given atoms and coefficients (Matrix PCA) with step (a), i.e. Matrix PCA + whitened low
    rank; one sweep is (b), (c), (a), so J never increases (checked after every step to ``check_tol`` times the
    starting J; a larger increase raises). The atoms come out rescaled to unit Frobenius norm (J unchanged) but
    are in general not orthonormal any more. Items are the layers that share the atoms: the L blocks of one
    projection kind, or P * L for a dictionary common to P kinds.

    Args:
        weights: (N, out, in) dense weights.
        atoms: (S, out, in) starting atoms.
        coef: (N, S) starting coefficients.
        chols: N lower Cholesky factors (in, in) of the items' input autocorrelations.
        ranks: N low-rank ranks (0: no low-rank term for that item).
        iters: sweeps, or L-BFGS iterations (0: only the start, Matrix PCA + whitened low rank).
        damping: relative damping of the atom step's H when its Cholesky fails.
        tol: stop early when a sweep lowers J by less than tol * J.
        check_tol: allowed relative increase of J in one step (round-off) before raising.
        extrapolate: after each sweep also try the extrapolated point (D, C) + beta ((D, C) - previous (D, C)) with
            its optimal low rank (step (a)), taken only when it lowers J (so J still never increases); beta adapts
            (grows by 1.05 after a success, shrinks by 1.5 after a failure; Ang & Gillis 2019, "Accelerating
            nonnegative matrix factorization algorithms using extrapolation"). Plain BCD converges slowly here
            because atoms and low-rank terms compete for the same directions.
        method: 'bcd' (the sweeps above) or 'lbfgs'.
        lbfgs_chunk: L-BFGS iterations between two records of J.

    Returns:
        dict with atoms (S, out, in), coef (N, S), u / v (lists of N (out, r_n), (r_n, in); None where r_n = 0),
        objective (N,) final per-item J, history (list of J after the start and after each sweep), all float64,
        and extrapolated (how many extrapolations were taken).
    """
    w = weights.detach().to(torch.float64)
    d = atoms.detach().to(torch.float64).clone()
    c = coef.detach().to(torch.float64).clone()
    chols = [r.detach().to(torch.float64) for r in chols]
    n_items, num_atoms = c.shape
    if w.ndim != 3 or d.shape[1:] != w.shape[1:] or c.shape[0] != w.shape[0] or d.shape[0] != num_atoms:
        raise ValueError(f'joint_refine: shapes do not fit: weights {tuple(w.shape)}, atoms {tuple(d.shape)}, '
                         f'coef {tuple(c.shape)}')
    if len(chols) != n_items or len(ranks) != n_items:
        raise ValueError(f'joint_refine needs one Cholesky factor and one rank per item ({n_items}), '
                         f'got {len(chols)} and {len(ranks)}')
    sig = torch.stack([r @ r.T for r in chols])  # (N, in, in)
    eye = torch.eye(w.shape[2], dtype=torch.float64)
    us: List[Optional[torch.Tensor]] = [None] * n_items
    vs: List[Optional[torch.Tensor]] = [None] * n_items
    lowrank = torch.zeros_like(w)

    def step_lowrank():
        target = w - torch.einsum('ns,soi->noi', c, d)
        for n, r in enumerate(ranks):
            if r:
                us[n], vs[n] = whitened_lowrank(target[n], None, int(r), chol=chols[n])
                lowrank[n] = us[n] @ vs[n]

    def step_coef():
        e = w - lowrank
        for n in range(n_items):
            ds = torch.einsum('soi,ij->soj', d, sig[n])  # D_s Sigma_n
            a = torch.einsum('soj,toj->st', ds, d)
            b = torch.einsum('soj,oj->s', ds, e[n])
            c[n] = torch.linalg.pinv(0.5 * (a + a.T), hermitian=True, rtol=1e-13) @ b

    def step_atoms():
        es = torch.einsum('noi,nij->noj', w - lowrank, sig)  # E_n Sigma_n
        for s in range(num_atoms):
            h = torch.einsum('n,nij->ij', c[:, s].square(), sig)
            if not bool(h.abs().sum() > 0):
                continue  # no item uses this atom
            bmat = torch.einsum('n,noj->oj', c[:, s], es)
            for t in range(num_atoms):
                if t != s:
                    bmat = bmat - d[t] @ torch.einsum('n,nij->ij', c[:, s] * c[:, t], sig)
            h = 0.5 * (h + h.T)
            factor, info = torch.linalg.cholesky_ex(h)
            tries, damped = 0, False
            while int(info) != 0:
                if tries >= 8:
                    raise RuntimeError('joint_refine: the atom step matrix is singular even after damping')
                factor, info = torch.linalg.cholesky_ex(h + damping * 10 ** tries * float(h.diagonal().mean()) * eye)
                tries, damped = tries + 1, True
            new = torch.cholesky_solve(bmat.T, factor).T  # D H = B  <=>  H D^T = B^T
            if damped:
                # J(D) = const - 2 <D, B> + <D H, D>; keep the old atom if the damped solve does not improve it
                delta = (-2 * ((new - d[s]) * bmat).sum() + ((new @ h) * new).sum() - ((d[s] @ h) * d[s]).sum())
                if float(delta) > 0:
                    continue
            d[s] = new

    if method not in ('bcd', 'lbfgs'):
        raise ValueError(f"method must be 'bcd' or 'lbfgs', got {method!r}")
    step_lowrank()
    history = [float(_whitened_objective(w, d, c, lowrank, chols).sum())]
    start = history[0]
    beta, beta_max, accepted = 0.5, 1.0, 0
    if method == 'lbfgs':
        d_var, c_var = d.clone().requires_grad_(True), c.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([d_var, c_var], lr=1, max_iter=lbfgs_chunk, history_size=20,
                                line_search_fn='strong_wolfe', tolerance_grad=0., tolerance_change=0.)

        def closure():
            opt.zero_grad()
            with torch.no_grad():
                d.copy_(d_var)
                c.copy_(c_var)
                step_lowrank()  # optimal U V for this (D, C); held fixed, so backward gives the envelope gradient
            err = w - torch.einsum('ns,soi->noi', c_var, d_var) - lowrank
            obj = sum((e @ r).square().sum() for e, r in zip(err, chols))
            obj.backward()
            return obj

        best = (history[0], d.clone(), c.clone())
        done = 0
        while done < iters:
            opt.param_groups[0]['max_iter'] = min(lbfgs_chunk, iters - done)
            opt.step(closure)
            done += lbfgs_chunk
            with torch.no_grad():
                d.copy_(d_var)
                c.copy_(c_var)
                step_lowrank()
            cur = float(_whitened_objective(w, d, c, lowrank, chols).sum())
            if not cur < best[0]:
                break
            best = (cur, d.clone(), c.clone())
            history.append(cur)
            if tol > 0 and history[-2] - history[-1] < tol * history[-2]:
                break
        d, c = best[1], best[2]
        step_lowrank()
        if float(_whitened_objective(w, d, c, lowrank, chols).sum()) > history[0] + check_tol * max(start, 1e-300):
            raise RuntimeError('joint_refine: L-BFGS ended above its start')
        iters = 0  # no sweeps
    for it in range(iters):
        prev = history[-1]
        d_old, c_old = d.clone(), c.clone()
        for name, step in (('coefficients', step_coef), ('atoms', step_atoms), ('low rank', step_lowrank)):
            step()
            cur = float(_whitened_objective(w, d, c, lowrank, chols).sum())
            if cur > prev + check_tol * max(start, torch.finfo(torch.float64).tiny):
                raise RuntimeError(f'joint_refine: the {name} step of sweep {it} raised the objective from {prev:.6g} '
                                   f'to {cur:.6g}')
            prev = cur
        if extrapolate and it > 0:
            saved = (d.clone(), c.clone(), lowrank.clone(), list(us), list(vs))
            d.add_(beta * (d - d_old))
            c.add_(beta * (c - c_old))
            step_lowrank()
            cur = float(_whitened_objective(w, d, c, lowrank, chols).sum())
            if cur < prev:
                prev, accepted = cur, accepted + 1
                beta, beta_max = min(beta_max, 1.05 * beta), min(_EXTRAPOLATION_MAX, 1.01 * beta_max)
            else:
                d, c, lowrank, us[:], vs[:] = saved[0], saved[1], saved[2], saved[3], saved[4]
                beta_max, beta = beta, beta / 1.5
        history.append(prev)
        if tol > 0 and history[-2] - history[-1] < tol * history[-2]:
            break
    # unit-norm atoms (friendlier to fine-tuning; the composed weights and J are unchanged)
    norms = d.flatten(1).norm(dim=1)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    d = d / scale[:, None, None]
    c = c * scale[None]
    return dict(atoms=d, coef=c, u=us, v=vs, objective=_whitened_objective(w, d, c, lowrank, chols), history=history,
                extrapolated=accepted)


# ---------------------------------------------------------------------------------------------------
# Sequential (error-correcting) refit of one layer on the converted model's own inputs
# ---------------------------------------------------------------------------------------------------

def error_correcting_target(weight: torch.Tensor, cross: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """The weight T that turns "reproduce the dense outputs from the converted model's inputs" into a whitened
    low-rank problem.

    With dense inputs X and the converted model's inputs Xc of the same tokens (N, in), fitting W^ to the dense
    outputs is min ||W X^T - W^ Xc^T||_F. With C = Xc^T Xc = Lc Lc^T and the cross-correlation
    A = X^T Xc (``cross``, (in, in)), expanding the square gives
    ||W X^T - W^ Xc^T||_F^2 = ||(T - W^) Lc||_F^2 + const,  T = W A C^{-1},
    (the normal equations of the least squares in W^ are W^ C = W A), so every whitened tool (`whitened_lowrank`,
    the coefficient least squares) applies unchanged to the target T with the factor Lc. When Xc = X, T = W.

    Args:
        weight: The dense (out, in) weight W.
        cross: X^T Xc, dense inputs times converted inputs, summed over the same tokens.
        chol: Lower Cholesky factor Lc of Xc^T Xc (damped as `cholesky_factor` does; C^{-1} is taken as
            (Lc Lc^T)^{-1}).
    """
    w = weight.to(torch.float64)
    # T^T = C^{-1} A^T W^T (C symmetric)
    return torch.cholesky_solve(cross.to(torch.float64).T @ w.T, chol.to(torch.float64)).T


def refit_coef_lowrank(
        target: torch.Tensor,
        atoms: Optional[torch.Tensor],
        coef: Optional[torch.Tensor],
        chol: torch.Tensor,
        rank: int,
        sweeps: int = 10,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Refit one layer's coefficients and low-rank term with the atoms held fixed, on the whitened objective
    J = ||(T - sum_s c_s D_s - U V) L||_F^2.

    Alternates the exact minimizers of `joint_refine`'s steps (a) (whitened truncated SVD of T - sum_s c_s D_s) and
    (b) (the S x S least squares for c given T - U V), starting with (a) at the given coefficients, so J never
    increases. Without atoms (a low-rank-only layer) it is step (a) alone.

    Args:
        target: (out, in) weight to approximate (the dense weight, or `error_correcting_target`).
        atoms: (S, out, in) fixed atoms, or None.
        coef: (S,) starting coefficients, or None.
        chol: (in, in) lower Cholesky factor of the layer's input autocorrelation.
        rank: Rank of U V.
        sweeps: Alternations of (a) and (b).

    Returns:
        coef (S,) or None, U (out, rank), V (rank, in), all float64.
    """
    t = target.to(torch.float64)
    chol = chol.to(torch.float64)
    if atoms is None:
        u, v = whitened_lowrank(t, None, rank, chol=chol)
        return None, u, v
    d = atoms.to(torch.float64)
    c = coef.to(torch.float64).clone()
    dw = (d @ chol).flatten(1)  # (S, out * in), whitened atoms
    gram = dw @ dw.T
    pinv = torch.linalg.pinv(gram)
    u, v = whitened_lowrank(t - torch.einsum('s,soi->oi', c, d), None, rank, chol=chol)
    for _ in range(sweeps):
        c = pinv @ (dw @ ((t - u @ v) @ chol).flatten())
        u, v = whitened_lowrank(t - torch.einsum('s,soi->oi', c, d), None, rank, chol=chol)
    return c, u, v
