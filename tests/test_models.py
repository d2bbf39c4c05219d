import os
import re

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_layer_decay

import masa_vit
from masa_vit import AtomLinear

MODELS = timm.list_models('masa_*')
SHARINGS = ['masa', 'dense', 'sequential', 'cycle', 'low_rank', 'gqa']


def test_registered_names():
    assert MODELS == sorted([
        'masa_vit_tiny', 'masa_vit_small', 'masa_vit_base', 'masa_vit_large',
        'masa_vit_nano_patch4_32', 'masa_vit_micro_patch4_32', 'masa_vit_microd_patch4_32'])
    assert set(timm.list_models(module='masa_vision_transformer')) == set(MODELS)


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    m = timm.create_model(name)
    cfg = m.pretrained_cfg
    x = torch.randn(1, *cfg['input_size'])
    out = m(x)
    assert out.shape == (1, cfg['num_classes'])
    out.mean().backward()
    no_grad = [n for n, p in m.parameters_and_names()] if False else [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad
    assert m.dictionaries[0].atoms.grad.abs().sum() > 0 and m.dictionaries[0].coef.grad.abs().sum() > 0
    depth = len(m.blocks)
    assert m.dictionaries[0].atoms.shape[:2] == (4, depth // 3)  # QKVO, S = depth // 3


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_consistency(name):
    m = timm.create_model(name, pretrained=False, num_classes=7)
    cfg = m.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'first_conv', 'classifier', 'num_classes', 'crop_pct', 'interpolation'):
        assert key in cfg
    modules = dict(m.named_modules())
    assert cfg['first_conv'] in modules and isinstance(modules[cfg['first_conv']], nn.Conv2d)
    assert cfg['classifier'] in modules and modules[cfg['classifier']].out_features == 7
    assert cfg['input_size'][1] == m.patch_embed.img_size[0]
    m.reset_classifier(0)
    x = torch.randn(1, *cfg['input_size'])
    assert m(x).shape == (1, m.num_features)
    m.reset_classifier(3)
    assert m(x).shape == (1, 3)


def test_create_model_kwargs_and_twin(tiny_kwargs):
    m = timm.create_model('masa_vit_small', num_classes=100, num_atoms=6, share='qkv', img_size=32, patch_size=8)
    assert m.dictionaries[0].atoms.shape == (3, 6, 384, 384) and m.head.out_features == 100
    assert isinstance(m.blocks[0].attn.qkv, AtomLinear) and type(m.blocks[0].attn.proj) is nn.Linear  # O per block
    twin = timm.create_model('masa_vit_small', sharing='dense', img_size=32, patch_size=8)
    ref = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8)
    assert len(twin.dictionaries) == 0
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # same init recipe: the attention weights have timm's std
    assert abs(twin.blocks[0].attn.qkv.weight.std().item() / 0.02 - 1) < 0.05


@pytest.mark.parametrize('sharing', SHARINGS)
def test_sharing_methods_train_and_export(sharing, tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', sharing=sharing, **tiny_kwargs)
    x = torch.randn(2, 3, 32, 32)
    m(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if 'head' not in n)
    m.eval()
    dense = masa_vit.to_dense(m).eval()
    assert type(dense) is timm.models.VisionTransformer
    with torch.no_grad():
        assert (dense(x) - m(x)).abs().max() < 1e-5


@pytest.mark.parametrize('opts', [
    dict(coef='mlp'), dict(dictionary='common'), dict(groups=2), dict(groups=[0, 2], num_atoms=[1, 2]),
    dict(share='qkv'), dict(share='qv'), dict(refine_rank=dict(q=3, o=2)), dict(dictionary='common', coef='mlp'),
    dict(share='qkvo+mlp'), dict(share='mlp', mlp_num_atoms=3), dict(share='qkvo+mlp', sharing='cycle'),
    dict(share='qkv+mlp', sharing='low_rank'), dict(share='qkvo+mlp', sharing='sequential', groups=2, num_atoms=1),
])
def test_masa_options_gradients_and_dense_parity(opts, tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs, **opts)
    x = torch.randn(2, 3, 32, 32)
    m(x).logsumexp(-1).mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    m.eval()
    with torch.no_grad():
        assert (masa_vit.to_dense(m).eval()(x) - m(x)).abs().max() < 1e-5


def test_to_dense_loads_into_timm_vit():
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', img_size=64).eval()
    dense = masa_vit.to_dense(m)
    assert dense.pretrained_cfg['architecture'] == 'vit_tiny_patch16_224'
    ref = timm.create_model('vit_tiny_patch16_224', img_size=64).eval()
    ref.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ref(x) - m(x)).abs().max() < 1e-5


def test_fold_coefficients_roundtrip(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', coef='mlp', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
        m.fold_coefficients()
        torch.testing.assert_close(m(x), before, atol=1e-6, rtol=1e-6)
    assert m.masa_kwargs['coef'] == 'direct'
    direct = timm.create_model('masa_vit_tiny', **tiny_kwargs, **{k: v for k, v in m.masa_kwargs.items()}).eval()
    direct.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), before, atol=1e-6, rtol=1e-6)


def test_state_dict_unique_and_safetensors_roundtrip(tmp_path, tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    sd = m.state_dict()
    ptrs = [t.data_ptr() for t in sd.values()]
    assert len(ptrs) == len(set(ptrs))  # every shared tensor once
    assert sum(1 for k in sd if 'atoms' in k) == 1
    assert len(list(m.parameters())) == len(sd)
    save_file(sd, tmp_path / 'm.safetensors')  # refuses shared tensors, so this also checks uniqueness
    m2 = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    m2.load_state_dict(load_file(tmp_path / 'm.safetensors'), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_base_checkpoint_is_22_percent_smaller(tmp_path):
    masa = timm.create_model('masa_vit_base')
    dense = timm.create_model('masa_vit_base', sharing='dense')
    save_file(masa.state_dict(), tmp_path / 'masa.safetensors')
    save_file(dense.state_dict(), tmp_path / 'dense.safetensors')
    ratio = os.path.getsize(tmp_path / 'masa.safetensors') / os.path.getsize(tmp_path / 'dense.safetensors')
    # attention is 28.3M of 86.6M params, MASA-QKVO S=4 removes 2/3 of it: 1 - 18.9 / 86.6 = 0.782
    assert 0.775 < ratio < 0.785, ratio


def test_count_params_exact_formula():
    m = timm.create_model('masa_vit_base')
    d, L, S = 768, 12, 4
    c = masa_vit.count_params(m)
    assert c['total'] == sum(p.numel() for p in m.parameters())
    assert c['attention_dense'] == L * (4 * d * d + 4 * d)
    assert c['attention'] == 4 * S * d * d + 4 * L * S + L * 4 * d  # atoms + coefficients + per-block biases
    assert c['attention_compression'] == pytest.approx(1 - c['attention'] / c['attention_dense'])
    assert c['attention_compression'] == pytest.approx(1 - S / L, abs=2e-3)
    dense = masa_vit.count_params(timm.create_model('vit_base_patch16_224'))
    assert dense['attention'] == dense['attention_dense'] == c['attention_dense']
    assert dense['total'] - c['total'] == c['attention_dense'] - c['attention']


def test_no_weight_decay_and_layer_decay_groups(tiny_kwargs):
    m = timm.create_model('masa_vit_tiny', coef='mlp', groups=[0, 3], num_atoms=2, **tiny_kwargs)
    nwd = m.no_weight_decay()
    coef_names = {n for n, _ in m.named_parameters() if n.startswith('dictionaries.') and '.atoms' not in n}
    assert coef_names and coef_names <= nwd
    assert not any('.atoms' in n for n in nwd)
    opt = create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05)
    params = {id(p): n for n, p in m.named_parameters()}
    decayed = {params[id(p)] for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert 'dictionaries.0.atoms' in decayed and not (coef_names & decayed)
    groups = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.75)
    scale = {n: g['lr_scale'] for g in groups for n in g['param_names']} if 'param_names' in groups[0] else None
    layer_of = {}
    for g in groups:
        for p in g['params']:
            layer_of[params[id(p)]] = g['lr_scale']
    assert layer_of['dictionaries.0.atoms'] == layer_of['blocks.0.norm1.weight']
    assert layer_of['dictionaries.1.atoms'] == layer_of['blocks.3.norm1.weight']
    assert layer_of['dictionaries.1.atoms'] > layer_of['dictionaries.0.atoms']


def test_grad_checkpointing_equal(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out_ckpt = m(x)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_features_intermediates_and_getter_see_same_weights(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    feat = timm.create_model('masa_vit_tiny', features_only=True, out_indices=(1, 5), **tiny_kwargs).eval()
    missing, unexpected = feat.model.load_state_dict(m.state_dict(), strict=False)  # features_only drops the head
    assert not missing and all(k.startswith(('head', 'norm')) for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=(1, 5))
        torch.testing.assert_close(final, m.forward_features(x))
        fo = feat(x)
        # the eval cache is on in both, so the getter and the model must agree exactly
        for a, b in zip(fo, inter):
            torch.testing.assert_close(a, b)
        assert fo[1].shape == (2, 32, 4, 4)


def test_dynamic_img_size(tiny_kwargs):
    m = timm.create_model('masa_vit_tiny', dynamic_img_size=True, **tiny_kwargs)
    assert m(torch.randn(1, 3, 48, 40)).shape == (1, 5)


def test_fx_trace_and_export_match_eager(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        gm = torch.fx.symbolic_trace(m)  # traced with the eval cache warm: it must not bake the cached weights in
        torch.testing.assert_close(gm(x), ref)
        assert not [n for n in gm.graph.nodes if n.op == 'get_attr' and 'tensor_constant' in str(n.target)]
        atoms = [p for n, p in m.named_parameters() if 'atoms' in n]
        for a in atoms:
            a.mul_(2.0)  # the traced graph composes from the live atoms
        torch.testing.assert_close(gm(x), m(x))
        assert not torch.allclose(gm(x), ref)
    ep = torch.export.export(m, (x,))
    # the atoms are graph inputs of the exported program, once
    assert sum('atoms' in n for n in ep.state_dict) == 1
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))


def test_torch_compile_matches_eager(tiny_kwargs):
    torch.manual_seed(0)
    kw = dict(tiny_kwargs, depth=3)
    m = timm.create_model('masa_vit_tiny', num_atoms=1, **kw)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m)
    out = compiled(x)
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.dictionaries[0].atoms.grad.abs().sum() > 0


def test_jit_script_refused_with_pointer_to_dense(tiny_kwargs):
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    with pytest.raises(RuntimeError, match='to_dense'):
        torch.jit.script(m)
    scripted = torch.jit.script(masa_vit.to_dense(m))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (scripted(x) - m(x)).abs().max() < 1e-5
    twin = timm.create_model('masa_vit_tiny', sharing='dense', **tiny_kwargs)
    torch.jit.script(twin)  # the dense twin is a plain ViT


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_atoms=0), r'num_atoms=0 is out of range for group 0 \(blocks 0-5\): it must be between 1 and 6'),
    (dict(num_atoms=7), r'num_atoms=7 is out of range'),
    (dict(groups=2, num_atoms=4), r'num_atoms=4 is out of range for group 0 \(blocks 0-2\)'),
    (dict(share='qkx'), r"share='qkx' is invalid \(unknown letters 'x'\)"),
    (dict(share=''), r"share='' is invalid"),
    (dict(groups=[1, 3]), r'does not partition the 6 blocks'),
    (dict(groups=[0, 3, 3]), r'does not partition'),
    (dict(groups=0), r'groups=0 is out of range'),
    (dict(num_heads=5), r'embed_dim=32 is not divisible by num_heads=5'),
    (dict(sharing='shared'), r"sharing='shared' is unknown"),
    (dict(dictionary='global'), r"dictionary='global' is unknown"),
    (dict(coef='svd'), r"coef='svd' is unknown"),
    (dict(num_atoms=[1, 2]), r'gives 2 values for 1 groups'),
    (dict(refine_rank=dict(x=2)), r'refine_rank has unknown or unshared projections'),
])
def test_bad_input_errors(kwargs, match, tiny_kwargs):
    with pytest.raises(ValueError, match=match):
        timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, **kwargs))


def test_dense_checkpoint_refused_with_pointer_to_conversion(tiny_kwargs):
    dense = timm.create_model('vit_tiny_patch16_224', **tiny_kwargs)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r'dense ViT checkpoint.*masa_vit.from_dense'):
            m.load_state_dict(dense.state_dict(), strict=strict)


def test_attention_budget_of_each_method_at_the_paper_setting():
    """ViT-S shape (d=384, L=12, 6 heads) at S = L / 3 = 4: every method's exact attention parameter count."""
    d, L, S = 384, 12, 4
    kw = dict(img_size=32, patch_size=16)
    dense = L * (4 * d * d + 4 * d)
    biases = L * 4 * d
    expected = {
        'masa': 4 * S * d * d + 4 * L * S + biases,  # atoms + coefficients + biases
        'sequential': 4 * S * d * d + biases,  # S weight sets, no coefficients
        'cycle': 4 * S * d * d + biases,
        'low_rank': L * 4 * (2 * d * (d // 6)) + biases,  # r = d S / (2 L) = d / 6 = 64
        'gqa': L * (d * d + 2 * d * 64 + d + 2 * 64 + d * d + d),  # 1 kv head of dim 64
    }
    for sharing, attention in expected.items():
        c = masa_vit.count_params(timm.create_model('masa_vit_small', sharing=sharing, **kw))
        assert c['attention'] == attention, sharing
        assert c['attention_dense'] == dense, sharing
    masa = masa_vit.count_params(timm.create_model('masa_vit_small', **kw))['attention_compression']
    gqa = masa_vit.count_params(timm.create_model('masa_vit_small', sharing='gqa', **kw))['attention_compression']
    assert masa == pytest.approx(2 / 3, abs=2e-3)
    assert gqa == pytest.approx(1 - (2 + 1 / 3) / 4, abs=2e-3)  # the paper's 41.7% GQA budget
    for sharing in ('sequential', 'cycle', 'low_rank'):
        comp = masa_vit.count_params(timm.create_model('masa_vit_small', sharing=sharing, **kw))['attention_compression']
        assert comp == pytest.approx(masa, abs=2e-3), sharing


def test_sequential_and_cycle_assignments(tiny_kwargs):
    seq = timm.create_model('masa_vit_tiny', sharing='sequential', num_atoms=3, **tiny_kwargs)
    cyc = timm.create_model('masa_vit_tiny', sharing='cycle', num_atoms=3, **tiny_kwargs)
    assert seq.dictionaries[0].assign == (0, 0, 1, 1, 2, 2)
    assert cyc.dictionaries[0].assign == (0, 1, 2, 0, 1, 2)
    w = [blk.attn.qkv.composed_weight() for blk in seq.blocks]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_mlp_sharing_counts(tiny_kwargs):
    m = timm.create_model('masa_vit_tiny', share='qkvo+mlp', mlp_num_atoms=2, **tiny_kwargs)
    d, h, L, S = 32, 128, 6, 2
    c = masa_vit.count_params(m)
    assert c['mlp_dense'] == L * (2 * d * h + h + d)
    assert c['mlp'] == S * (h * d + d * h) + 2 * L * S + L * (h + d)
    assert m.masa_kwargs['share'] == 'qkvo+mlp'
    assert {e['name'] for e in masa_vit.coefficient_matrices(m)} == {'q', 'k', 'v', 'o', 'fc1', 'fc2'}
    assert 'mlp_dictionaries.0.fc1.coef' in m.no_weight_decay()


def test_gqa_to_dense_is_exact_multi_head(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', sharing='gqa', num_kv_heads=2, **tiny_kwargs).eval()
    ref = timm.create_model('vit_tiny_patch16_224', **tiny_kwargs).eval()
    ref.load_state_dict(masa_vit.to_dense(m).state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - m(x)).abs().max() < 1e-5
    # the dense twin's init recipe (timm's trunc_normal(0.02), zero biases), not nn.Linear's default
    big = timm.create_model('masa_vit_small', sharing='gqa', img_size=32)
    for lin in (big.blocks[0].attn.qkv, big.blocks[0].attn.proj):
        assert abs(lin.weight.std().item() / 0.02 - 1) < 0.05 and lin.bias.abs().max() == 0
    with pytest.raises(ValueError, match='num_kv_heads=3 must divide num_heads=4'):
        timm.create_model('masa_vit_tiny', sharing='gqa', num_kv_heads=3, **tiny_kwargs)


def test_pretrained_tag_converts_local_dense_checkpoint_on_load(tmp_path):
    """The 'mpca_*' tags load a dense timm ViT checkpoint through checkpoint_filter_fn (offline via a local file)."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=4)
    dense = timm.create_model('vit_tiny_patch16_224', **kw).eval()
    save_file(dense.state_dict(), tmp_path / 'dense.safetensors')
    overlay = dict(file=str(tmp_path / 'dense.safetensors'))
    name = 'masa_vit_tiny.mpca_augreg_in21k_ft_in1k'
    assert name in timm.list_pretrained('masa_*')
    assert timm.create_model('masa_vit_tiny').pretrained_cfg['tag'] == 'scratch'  # the default stays untrained
    exact = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_atoms=6, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exact(x) - dense(x)).abs().max() < 1e-5  # S = L: Matrix PCA reconstructs every block exactly
    compressed = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw).eval()
    assert compressed.dictionaries[0].atoms.shape[:2] == (4, 2)
    torch.testing.assert_close(compressed.head.weight, dense.head.weight)  # non-attention weights are the dense ones


def test_low_rank_baseline_starts_at_the_dense_scale():
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_small', sharing='low_rank', img_size=32)
    w = m.blocks[0].attn.qkv.composed_weight().detach()
    assert abs(w.std().item() / 0.02 - 1) < 0.05
