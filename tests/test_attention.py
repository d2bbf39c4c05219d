import pytest
import timm
import torch
import torch.nn as nn

import masa_vit
from masa_vit import AtomDictionary, AtomLinear


def _copy_dense_into_masa(dense, masa):
    """Make a MASA model with S = L reproduce a dense model: atoms = the dense weights, coefficients = identity."""
    sd = {k: v for k, v in dense.state_dict().items()}
    depth, d = len(dense.blocks), dense.embed_dim
    w = torch.stack([torch.cat([blk.attn.qkv.weight.view(3, d, d), blk.attn.proj.weight[None]]) for blk in dense.blocks])
    with torch.no_grad():
        masa.dictionaries[0].atoms.copy_(w.permute(1, 0, 2, 3))  # (P=4, S=L, d, d)
        masa.dictionaries[0].coef.copy_(torch.eye(depth).expand(4, depth, depth))
        for k in list(sd):
            if k.endswith('attn.qkv.weight') or k.endswith('attn.proj.weight'):
                sd.pop(k)
        missing, unexpected = masa.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith('dictionaries.') for k in missing)


def test_matches_timm_attention_when_atoms_reproduce_weights(tiny_kwargs):
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', **tiny_kwargs).eval()
    masa = timm.create_model('masa_vit_tiny', num_atoms=tiny_kwargs['depth'], **tiny_kwargs).eval()
    _copy_dense_into_masa(dense, masa)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(masa(x), dense(x), atol=1e-5, rtol=1e-5)


def test_fused_equals_unfused(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = m(x)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        unfused = m(x)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


def test_atom_linear_all_own_is_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 12)
    al = AtomLinear(6, 4, ('q', 'k', 'v'), ('own', 'own', 'own'))
    al.load_state_dict(lin.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(al(x), lin(x))


def test_mixed_parts_and_lowrank_compose_in_row_order():
    torch.manual_seed(0)
    d = AtomDictionary(('q', 'v'), num_blocks=2, num_atoms=2, out_features=4, in_features=4)
    al = AtomLinear(4, 4, ('q', 'k', 'v'), ('shared', 'own', 'shared'), dictionary=d, block=1, lowrank={'v': 2})
    nn.init.normal_(al.lowrank['v_v'])
    w = al.composed_weight().view(3, 4, 4)
    qv = d.weight(1, 0, 2).view(2, 4, 4)
    torch.testing.assert_close(w[0], qv[0])
    torch.testing.assert_close(w[1], al.weight)
    torch.testing.assert_close(w[2], qv[1] + al.lowrank['v_u'] @ al.lowrank['v_v'])


class TestEvalCache:
    def _model(self, tiny_kwargs):
        torch.manual_seed(0)
        return timm.create_model('masa_vit_tiny', **tiny_kwargs)

    def test_cached_equals_uncached_and_is_reused(self, tiny_kwargs):
        m = self._model(tiny_kwargs).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out1 = m(x)
            qkv = m.blocks[0].attn.qkv
            cached = qkv.cached_weight
            out2 = m(x)
            assert qkv.cached_weight is cached  # reused, not rebuilt
        uncached = m(x)  # grad enabled: never cached (all blocks composed in one batched GEMM: rounding may differ)
        torch.testing.assert_close(out1, out2, rtol=0, atol=0)
        torch.testing.assert_close(out1, uncached.detach(), rtol=1e-5, atol=1e-6)
        assert uncached.requires_grad

    def test_invalidated_by_optimizer_step(self, tiny_kwargs):
        m = self._model(tiny_kwargs)
        x = torch.randn(2, 3, 32, 32)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.eval()
        with torch.no_grad():
            before = m(x)
        m(x).square().mean().backward()  # eval mode, grad enabled: still trains the atoms
        opt.step()
        with torch.no_grad():
            after = m(x)
            m.clear_cache()
            fresh = m(x)
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(after, fresh, rtol=0, atol=0)

    def test_invalidated_by_load_state_dict_train_and_dtype(self, tiny_kwargs):
        m = self._model(tiny_kwargs).eval()
        other = self._model(tiny_kwargs)
        torch.manual_seed(1)
        other.init_weights()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            m(x)
            m.load_state_dict(other.state_dict())
            torch.testing.assert_close(m(x), other.eval()(x), rtol=0, atol=0)
        m.train()
        assert all(mod.cached_weight is None for mod in m.modules() if isinstance(mod, AtomLinear))
        m.eval()
        with torch.no_grad():
            ref = m(x)
            m.double()
            out64 = m(x.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), ref, atol=1e-5, rtol=1e-5)
