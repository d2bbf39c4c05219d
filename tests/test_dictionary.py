import pytest
import torch

from masa_vit import AtomDictionary


@pytest.mark.parametrize('common', [False, True])
@pytest.mark.parametrize('coef', ['direct', 'mlp'])
def test_compose_equals_explicit_sum(common, coef):
    torch.manual_seed(0)
    d = AtomDictionary(('q', 'k', 'v', 'o'), num_blocks=5, num_atoms=3, out_features=8, in_features=6,
                       common=common, coef=coef)
    c = d.coefficients()
    assert c.shape == (4, 5, 3)
    for block in range(5):
        w = d.weight(block, 0, 4).view(4, 8, 6)
        for p in range(4):
            atoms = d.atoms[0] if common else d.atoms[p]
            expected = sum(c[p, block, s] * atoms[s] for s in range(3))
            torch.testing.assert_close(w[p], expected, atol=1e-6, rtol=1e-6)
        # a sub-range of kinds is the matching slice of the full stack
        torch.testing.assert_close(d.weight(block, 1, 3), w[1:3].reshape(16, 6))


def test_select_mode_uses_one_atom_per_block():
    d = AtomDictionary(('q', 'o'), num_blocks=6, num_atoms=3, out_features=4, in_features=4,
                       coef='select', assign=[0, 0, 1, 1, 2, 2])
    for block, a in enumerate([0, 0, 1, 1, 2, 2]):
        torch.testing.assert_close(d.weight(block, 0, 2).view(2, 4, 4), d.atoms[:, a])
    assert [n for n, _ in d.named_parameters()] == ['atoms']


def test_init_scale_matches_dense_and_blocks_differ():
    torch.manual_seed(0)
    for coef in ('direct', 'mlp'):
        d = AtomDictionary(('q', 'k', 'v', 'o'), num_blocks=12, num_atoms=4, out_features=192, in_features=192,
                           coef=coef)
        w = torch.stack([d.weight(b, 0, 4).detach() for b in range(12)])  # (L, 4 * out, in)
        stds = w.view(12, 4, -1).std(dim=-1)
        # timm's dense init is trunc_normal(std=0.02): every composed matrix within 10% of it
        assert ((stds / 0.02 - 1).abs() < 0.10).all(), stds
        for a in range(12):
            for b in range(a + 1, 12):
                assert (w[a] - w[b]).abs().max() > 1e-3


def test_fold_keeps_weights_and_switches_to_direct():
    torch.manual_seed(0)
    d = AtomDictionary(('q', 'k'), num_blocks=4, num_atoms=2, out_features=5, in_features=5, coef='mlp')
    before = torch.stack([d.weight(b, 0, 2) for b in range(4)]).detach()
    d.fold()
    after = torch.stack([d.weight(b, 0, 2) for b in range(4)]).detach()
    torch.testing.assert_close(before, after)
    assert d.coef_mode == 'direct' and not hasattr(d, 'coef_mlp')
    assert sorted(n for n, _ in d.named_parameters()) == ['atoms', 'coef']


def test_gradients_reach_atoms_and_coefficients():
    d = AtomDictionary(('q',), num_blocks=3, num_atoms=2, out_features=4, in_features=4)
    sum(d.weight(b, 0, 1).square().sum() for b in range(3)).backward()
    assert d.atoms.grad is not None and d.atoms.grad.abs().sum() > 0
    assert d.coef.grad is not None and (d.coef.grad.abs().sum(-1) > 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match='coef must be one of'):
        AtomDictionary(('q',), 3, 2, 4, 4, coef='nope')
    with pytest.raises(ValueError, match='assign must give'):
        AtomDictionary(('q',), 3, 2, 4, 4, coef='select', assign=[0, 1, 2])
