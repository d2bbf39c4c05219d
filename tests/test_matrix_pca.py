"""Matrix PCA, KL grouping, whitened low rank and rank allocation: numbers, no models."""
import math

import pytest
import torch

from masa_vit.matrix_pca import (
    allocate_ranks, cholesky_factor, error_correcting_target, input_autocorrelation, joint_refine, kl_group_starts,
    layer_kl_drift, matrix_pca, matrix_pca_common, matrix_pca_spectrum, refit_coef_lowrank, truncated_svd,
    whitened_lowrank, whitened_residual_spectrum, whitened_svd,
)

# tiny problems: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _correlated_stack(num_layers=8, out=24, inp=16, noise=0.1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, out, inp, generator=g, dtype=dtype)
    mix = torch.randn(num_layers, 3, generator=g, dtype=dtype)
    return torch.einsum('lk,koi->loi', mix, base) + noise * torch.randn(num_layers, out, inp, generator=g, dtype=dtype)


def _reconstruct(atoms, coef):
    return torch.einsum('ls,soi->loi', coef, atoms)


def test_atoms_orthonormal_and_coef_is_trace():
    w = _correlated_stack()
    atoms, coef = matrix_pca(w, 4)
    assert atoms.shape == (4, 24, 16) and coef.shape == (8, 4)
    flat = atoms.reshape(4, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    # c_{l,s} = tr(D_s^T W_l)
    trace = torch.einsum('soi,loi->ls', atoms, w)
    assert torch.allclose(coef, trace, atol=1e-10)


def test_exact_reconstruction_when_s_equals_l():
    w = torch.randn(6, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    atoms, coef = matrix_pca(w, 6)
    assert (_reconstruct(atoms, coef) - w).abs().max() < 1e-10


def test_error_is_sqrt_of_discarded_eigenvalues():
    w = _correlated_stack(num_layers=10)
    for s in (1, 2, 3, 5):
        atoms, coef, eig = matrix_pca(w, s, return_eigvals=True)
        err = (_reconstruct(atoms, coef) - w).norm()
        assert err.item() == pytest.approx(eig[s:].sum().sqrt().item(), rel=1e-8)
    assert torch.allclose(matrix_pca_spectrum(w), eig)
    # total energy = sum of all eigenvalues
    assert eig.sum().item() == pytest.approx((w ** 2).sum().item(), rel=1e-10)


def test_agrees_with_svd_of_flattened_stack():
    w = _correlated_stack(num_layers=7, noise=0.3)
    atoms, coef = matrix_pca(w, 3)
    u, s, vh = torch.linalg.svd(w.reshape(7, -1), full_matrices=False)
    # same subspace / same atoms up to sign
    for i in range(3):
        cos = torch.dot(atoms[i].flatten(), vh[i]).abs()
        assert cos.item() == pytest.approx(1.0, abs=1e-8)
    svd_recon = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(_reconstruct(atoms, coef).reshape(7, -1), svd_recon, atol=1e-10)


def test_float32_input_returns_float32_and_stays_orthonormal():
    w = _correlated_stack(noise=1e-3, dtype=torch.float32)
    atoms, coef = matrix_pca(w, 3)
    assert atoms.dtype == torch.float32 and coef.dtype == torch.float32
    flat = atoms.double().reshape(3, -1)
    assert (flat @ flat.T - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-5


def test_rank_deficient_stack_is_floored_not_nan():
    base = torch.randn(1, 6, 6, dtype=torch.float64)
    w = base.repeat(4, 1, 1) * torch.arange(1, 5, dtype=torch.float64)[:, None, None]  # rank 1
    atoms, coef = matrix_pca(w, 3)
    assert torch.isfinite(atoms).all() and torch.isfinite(coef).all()
    assert (_reconstruct(atoms, coef) - w).abs().max() < 1e-8


def test_bad_num_atoms():
    w = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match='between 1 and the number of layers'):
        matrix_pca(w, 5)
    with pytest.raises(ValueError):
        matrix_pca(w, 0)


def test_common_dictionary_is_pca_of_all_kinds():
    kinds = [_correlated_stack(num_layers=5, out=12, inp=12, seed=i) for i in range(4)]
    atoms, coef = matrix_pca_common(kinds, 6)
    assert atoms.shape == (6, 12, 12) and coef.shape == (4, 5, 6)
    flat = atoms.reshape(6, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(6, dtype=torch.float64), atol=1e-6)
    stacked = torch.cat(kinds)
    eig = matrix_pca_spectrum(stacked)
    recon = torch.einsum('pls,soi->ploi', coef, atoms)
    err = (recon - torch.stack(kinds)).norm()
    assert err.item() == pytest.approx(eig[6:].sum().sqrt().item(), rel=1e-8)


def test_kl_drift_and_groups():
    torch.manual_seed(0)
    n, c = 64, 10
    # 6 block outputs; a big change between block 2 and 3, a smaller one between 4 and 5
    a, b, d = torch.randn(n, c), torch.randn(n, c) * 3, torch.randn(n, c)
    logits = torch.stack([a, a + 0.01, a + 0.02, b, b + 0.01, b + 0.5 * d])
    drift = layer_kl_drift(logits)
    assert drift.shape == (5,)
    assert drift[0] < 1e-3 and drift[2] > 10 * drift[4] > 0
    # manual KL for one pair
    p = torch.softmax(logits[2].double(), -1)
    q = torch.softmax(logits[3].double(), -1)
    assert drift[2].item() == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-10)
    assert kl_group_starts(drift, 6, num_groups=2) == [0, 3]
    assert kl_group_starts(drift, 6, num_groups=3) == [0, 3, 5]
    assert kl_group_starts(drift, 6, threshold=drift[4].item() * 0.5) == [0, 3, 5]
    # with groups of >= 2 blocks, 3 groups can only be [0, 2, 4]; 2 groups keep the big cut
    assert kl_group_starts(drift, 6, num_groups=3, min_group_size=2) == [0, 2, 4]
    assert kl_group_starts(drift, 6, num_groups=2, min_group_size=2) == [0, 3]
    assert kl_group_starts(drift, 6, num_groups=1) == [0]
    # L + 1 entries: drift[b] is the change made by block b
    drift7 = torch.tensor([5.0, 0.1, 0.1, 3.0, 0.1, 0.1])
    assert kl_group_starts(drift7, 6, num_groups=2) == [0, 3]
    with pytest.raises(ValueError):
        kl_group_starts(drift, 6, num_groups=7)


def _correlated_inputs(tokens=2048, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -2, dim, dtype=torch.float64)
    return torch.randn(tokens, dim, generator=g, dtype=torch.float64) @ mix.T


def test_cholesky_factor_and_damping():
    x = _correlated_inputs()
    xtx = input_autocorrelation(x)
    chol = cholesky_factor(xtx, ridge=0)
    assert torch.allclose(chol @ chol.T, xtx, rtol=1e-8, atol=1e-8 * xtx.diagonal().mean().item())
    # the default adds a ridge of 1e-6 x the mean diagonal, and nothing else
    chol = cholesky_factor(xtx)
    ridge = 1e-6 * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    assert torch.allclose(chol @ chol.T, xtx + ridge, rtol=1e-8, atol=1e-8 * xtx.diagonal().mean().item())
    # fewer tokens than features: singular, needs damping
    few = x[:8]
    xtx_few = input_autocorrelation(few)
    chol = cholesky_factor(xtx_few, ridge=0)
    assert torch.isfinite(chol).all()
    shift = (chol @ chol.T - xtx_few).diagonal()
    assert shift.mean().item() == pytest.approx(1e-2 * xtx_few.diagonal().mean().item(), rel=1e-6)
    with pytest.raises(ValueError):
        cholesky_factor(torch.zeros(4, 4))


def test_whitened_lowrank_beats_plain_svd_on_output_error():
    g = torch.Generator().manual_seed(3)
    x = _correlated_inputs(dim=32)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    xtx = input_autocorrelation(x)
    for rank in (4, 8, 16):
        u, v = truncated_svd(w, rank)
        plain_out = ((w - u @ v) @ x.T).norm()
        plain_w = (w - u @ v).norm()
        uw, vw = whitened_svd(w, xtx, rank, chol=cholesky_factor(xtx, ridge=0))
        white_out = ((w - uw @ vw) @ x.T).norm()
        white_w = (w - uw @ vw).norm()
        assert u.shape == (48, rank) and v.shape == (rank, 32)
        assert white_out < 0.9 * plain_out  # data-aware wins on the outputs...
        assert plain_w <= white_w + 1e-9  # ...plain SVD is optimal in weight space
        # error equals the tail of the whitened spectrum
        sv = whitened_residual_spectrum(w, cholesky_factor(xtx, ridge=0))
        assert white_out.item() == pytest.approx(sv[rank:].square().sum().sqrt().item(), rel=1e-6)


def test_refinement_of_matrix_pca_residual():
    w = _correlated_stack(num_layers=6, out=32, inp=32, noise=0.2)
    atoms, coef = matrix_pca(w, 2)
    x = _correlated_inputs(dim=32, seed=5)
    xtx = input_autocorrelation(x)
    resid = w - _reconstruct(atoms, coef)
    before = (resid[0] @ x.T).norm()
    u, v = whitened_lowrank(resid[0], xtx, 4)
    up, vp = truncated_svd(resid[0], 4)
    after_white = ((resid[0] - u @ v) @ x.T).norm()
    after_plain = ((resid[0] - up @ vp) @ x.T).norm()
    assert after_white < after_plain < before
    # full rank reproduces the residual
    u, v = whitened_lowrank(resid[0], xtx, 32)
    assert torch.allclose(u @ v, resid[0], atol=1e-8)


def test_truncated_svd_full_rank_and_bad_rank():
    w = torch.randn(5, 7, dtype=torch.float64)
    u, v = truncated_svd(w, 5)
    assert torch.allclose(u @ v, w, atol=1e-12)
    with pytest.raises(ValueError):
        truncated_svd(w, 6)


def test_allocate_ranks_prefers_larger_energy_and_respects_budget():
    # role q has a flat, large spectrum; k decays fast
    spectra = {
        'q': torch.full((3, 16), 1.0, dtype=torch.float64),
        'k': torch.logspace(0, -4, 16, dtype=torch.float64).repeat(3, 1),
        'v': torch.full((3, 16), 0.5, dtype=torch.float64),
        'o': torch.full((3, 16), 0.9, dtype=torch.float64),
    }
    cost = {r: 3 * 32 for r in spectra}
    ranks = allocate_ranks(spectra, budget=20 * 96, cost_per_rank=cost)
    assert sum(ranks[r] * cost[r] for r in ranks) <= 20 * 96
    # q: 16 units of energy 1; k: its first unit (sigma 1) then sigma^2 < 0.3; o (0.81) before v (0.25)
    assert ranks == {'q': 16, 'k': 1, 'v': 0, 'o': 3}
    # with uneven costs the gain per parameter decides
    cost2 = dict(cost, q=10 * 96)
    ranks2 = allocate_ranks(spectra, budget=8 * 96, cost_per_rank=cost2)
    assert ranks2 == {'q': 0, 'k': 1, 'v': 0, 'o': 7}
    # step granularity and caps
    ranks3 = allocate_ranks(spectra, budget=20 * 96, cost_per_rank=cost, step=4, max_rank={'q': 8})
    assert ranks3['q'] == 8 and all(r % 4 == 0 for r in ranks3.values())
    assert sum(ranks3[r] * cost[r] for r in ranks3) <= 20 * 96


def _joint_problem(num_layers=6, out=12, inp=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = _correlated_stack(num_layers, out, inp, noise=0.5, seed=seed)
    chols = []
    for _ in range(num_layers):
        mix = torch.randn(inp, inp, generator=g, dtype=torch.float64)
        x = torch.randn(80, inp, generator=g, dtype=torch.float64) @ mix
        chols.append(cholesky_factor(input_autocorrelation(x)))
    return w, chols


@pytest.mark.parametrize('method, extrapolate', [('bcd', False), ('bcd', True), ('lbfgs', True)])
def test_joint_refine_never_increases_and_beats_plain_refinement(method, extrapolate):
    w, chols = _joint_problem()
    atoms, coef = matrix_pca(w, 2)
    ranks = [2, 2, 3, 0, 2, 2]
    out = joint_refine(w, atoms, coef, chols, ranks, 12, method=method, extrapolate=extrapolate)
    hist = out['history']
    # the start is Matrix PCA + whitened low rank (plain refinement)
    start = 0.0
    for l in range(6):
        resid = w[l] - torch.einsum('s,soi->oi', coef[l], atoms)
        if ranks[l]:
            resid = resid - torch.mm(*whitened_lowrank(resid, None, ranks[l], chol=chols[l]))
        start += float((resid @ chols[l]).square().sum())
    assert hist[0] == pytest.approx(start, rel=1e-10)
    assert len(hist) > 1
    assert all(b <= a + 1e-9 * hist[0] for a, b in zip(hist, hist[1:]))
    assert hist[-1] < 0.95 * hist[0]
    # the returned factors give the reported objective; unit-norm atoms, no low rank where the rank is 0
    rec = torch.einsum('ns,soi->noi', out['coef'], out['atoms'])
    total = 0.0
    for l in range(6):
        e = w[l] - rec[l] - (out['u'][l] @ out['v'][l] if ranks[l] else 0)
        total += float((e @ chols[l]).square().sum())
        assert (out['u'][l] is None) == (ranks[l] == 0)
        if ranks[l]:
            assert out['u'][l].shape == (12, ranks[l]) and out['v'][l].shape == (ranks[l], 10)
    assert total == pytest.approx(hist[-1], rel=1e-8)
    assert float(out['objective'].sum()) == pytest.approx(total, rel=1e-8)
    assert torch.allclose(out['atoms'].flatten(1).norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_joint_refine_zero_iters_is_plain_refinement_and_bad_input():
    w, chols = _joint_problem()
    atoms, coef = matrix_pca(w, 3)
    out = joint_refine(w, atoms, coef, chols, [2] * 6, 0)
    assert len(out['history']) == 1
    rec = torch.einsum('ns,soi->noi', out['coef'], out['atoms'])
    assert torch.allclose(rec, torch.einsum('ns,soi->noi', coef, atoms), atol=1e-10)
    with pytest.raises(ValueError, match='one Cholesky factor'):
        joint_refine(w, atoms, coef, chols[:3], [2] * 6, 1)
    with pytest.raises(ValueError, match='method'):
        joint_refine(w, atoms, coef, chols, [2] * 6, 1, method='adam')


def test_error_correcting_target_turns_dense_output_fit_into_whitened_problem():
    g = torch.Generator().manual_seed(3)
    n, out, inp = 200, 12, 10
    x = torch.randn(n, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    xc = x + 0.3 * torch.randn(n, inp, generator=g, dtype=torch.float64)  # the converted model's inputs
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    chol = cholesky_factor(xc.T @ xc, ridge=0)
    t = error_correcting_target(w, x.T @ xc, chol)
    # ||W X^T - W^ Xc^T||^2 = ||(T - W^) Lc||^2 + const for every W^
    gaps = []
    for _ in range(3):
        w_hat = torch.randn(out, inp, generator=g, dtype=torch.float64)
        gaps.append((w @ x.T - w_hat @ xc.T).square().sum() - ((t - w_hat) @ chol).square().sum())
    assert torch.allclose(torch.stack(gaps), gaps[0].expand(3), rtol=1e-9, atol=1e-8)
    # so the full-rank optimum is T, the least-squares solution of W^ Xc^T = W X^T
    assert torch.allclose(t, torch.linalg.lstsq(xc, x @ w.T).solution.T, atol=1e-8)
    # same inputs: the target is the dense weight
    assert torch.allclose(error_correcting_target(w, x.T @ x, cholesky_factor(x.T @ x, ridge=0)), w, atol=1e-8)


def test_refit_coef_lowrank_is_optimal_in_coefficients_and_never_worse():
    g = torch.Generator().manual_seed(4)
    out, inp, s, rank = 12, 10, 2, 3
    atoms = torch.randn(s, out, inp, generator=g, dtype=torch.float64)
    t = torch.einsum('s,soi->oi', torch.tensor([1.0, -0.5], dtype=torch.float64), atoms) \
        + 0.3 * torch.randn(out, inp, generator=g, dtype=torch.float64)
    xs = torch.randn(50, inp, generator=g, dtype=torch.float64)
    chol = cholesky_factor(xs.T @ xs)
    c0 = torch.tensor([0.2, 0.2], dtype=torch.float64)

    def objective(c, u, v):
        return ((t - torch.einsum('s,soi->oi', c, atoms) - u @ v) @ chol).square().sum()

    _, u0, v0 = refit_coef_lowrank(t, atoms, c0, chol, rank, sweeps=0)
    assert torch.allclose(u0 @ v0, torch.mm(*whitened_lowrank(t - torch.einsum('s,soi->oi', c0, atoms), None, rank,
                                                                chol=chol)))
    c1, u1, v1 = refit_coef_lowrank(t, atoms, c0, chol, rank, sweeps=1)
    c, u, v = refit_coef_lowrank(t, atoms, c0, chol, rank, sweeps=20)
    assert objective(c, u, v) <= objective(c1, u1, v1) <= objective(c0, u0, v0)
    assert objective(c, u, v) < 0.5 * objective(c0, u0, v0)  # c0 is far from the coefficients t was built with
    # each sweep ends with the low rank: the whitened optimum given the final coefficients
    assert torch.allclose(u @ v, torch.mm(*whitened_lowrank(t - torch.einsum('s,soi->oi', c, atoms), None, rank,
                                                            chol=chol)))
    # no atoms: the whitened low rank of the target
    none, u2, v2 = refit_coef_lowrank(t, None, None, chol, rank)
    assert none is None and torch.allclose(u2 @ v2, torch.mm(*whitened_lowrank(t, None, rank, chol=chol)))


def test_cholesky_ridge_bounds_error_correcting_target_after_layernorm():
    """LayerNorm outputs sum to zero over features: Xc^T Xc is positive definite in float64 only by float32
    rounding, and its inverse is huge along the all-ones direction. Without the ridge the sequential target
    T = W X^T Xc C^-1 grows by orders of magnitude along a direction no token has (and a fit to it follows); with it
    T keeps the weight's scale and the same output error on the tokens."""
    g = torch.Generator().manual_seed(0)
    ln = lambda t: torch.nn.functional.layer_norm(t, (32,)).double()  # noqa: E731  (a float32 model's activations)
    h = torch.randn(500, 32, generator=g)
    x, xc = ln(h), ln(h + 0.1 * torch.randn(500, 32, generator=g))  # dense, converted inputs
    w = torch.randn(24, 32, generator=g, dtype=torch.float64) * 0.1
    fits = {}
    for ridge in (0, 1e-6):
        t = error_correcting_target(w, x.T @ xc, cholesky_factor(xc.T @ xc, ridge=ridge))
        fits[ridge] = (float(t.abs().max()), float((t @ xc.T - w @ x.T).norm() / (w @ x.T).norm()))
    assert fits[0][0] > 100 * float(w.abs().max())  # the failure the ridge is there for
    assert fits[1e-6][0] < 10 * float(w.abs().max())
    assert fits[1e-6][1] == pytest.approx(fits[0][1], rel=1e-3, abs=1e-6)
