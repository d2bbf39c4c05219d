""" Correctness of the fast paths the speed benchmark relies on (benchmarks/bench_speed.py, docs/speed.md).

What is checked here: gradient checkpointing and DDP with the per-block weight reconstruction, and the eval weight
cache (bit-identical to the uncached and to the exported dense arithmetic, contiguous, bypassed whenever autograd
or a compiler is involved, and invalidated by whatever changes the weights). Never wall-clock time: speed is the
benchmark's job. The basic cache tests (reuse, optimizer step, load_state_dict, train(), double()) are in
test_attention.py.
"""
import copy
import os
import socket
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.utils import ModelEmaV3

import masa_vit
from masa_vit import AtomLinear
from masa_vit.masa_vision_transformer import SHARING_METHODS


def _atom_linears(m):
    return [mod for mod in m.modules() if isinstance(mod, AtomLinear)]


def _uncached(m, x):
    """Eval output of a deep copy whose caches are empty (the reference the cache must reproduce exactly)."""
    ref = copy.deepcopy(m)
    ref.clear_cache()
    with torch.no_grad():
        return ref(x)


VARIANTS = [dict(sharing=s) for s in SHARING_METHODS] + [
    dict(coef='mlp'), dict(dictionary='common'), dict(groups=2), dict(refine_rank=2), dict(share='qkv'),
    dict(share='qkvo+mlp'),
]


def _id(v):
    return ','.join(f'{k}={v}' for k, v in v.items())


@pytest.mark.parametrize('opts', VARIANTS, ids=_id)
def test_grad_checkpointing_same_outputs_and_grads(opts, tiny_kwargs):
    """timm's non-reentrant checkpointing recomputes the composed weights in backward: same grads everywhere."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, depth=4), **opts)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    out.logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.set_grad_checkpointing(True)
    out_ckpt = m(x)
    out_ckpt.logsumexp(-1).mean().backward()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# Batched composition: in autograd-recorded forward passes each dictionary composes all its blocks at once
# ---------------------------------------------------------------------------------------------------------------

BATCHED_VARIANTS = [dict(), dict(coef='mlp'), dict(dictionary='common'), dict(groups=2), dict(refine_rank=2),
                    dict(share='qkv'), dict(share='qkvo+mlp'), dict(sharing='cycle')]


def _grads(m, loss_fn):
    m.zero_grad(set_to_none=True)
    loss_fn(m).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _per_block_copy(m):
    ref = copy.deepcopy(m)
    for d in ref.modules():
        if isinstance(d, masa_vit.AtomDictionary):
            d.batched_compose = False
    return ref


@pytest.mark.parametrize('opts', BATCHED_VARIANTS, ids=_id)
def test_batched_composition_matches_per_block(opts, tiny_kwargs):
    """Same outputs and gradients as composing each block's weight in its own forward (to float rounding: one GEMM
    over all blocks instead of one per block)."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs, **opts)
    ref = _per_block_copy(m)
    x = torch.randn(3, 3, 32, 32)
    loss = lambda model: model(x).logsumexp(-1).mean()  # noqa: E731
    g, g_ref = _grads(m, loss), _grads(ref, loss)
    assert set(g) == set(g_ref) == {n for n, _ in m.named_parameters()}
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-6, rtol=1e-5, msg=n)
    torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=1e-5)


def _count_compositions(monkeypatch):
    from masa_vit import dictionary
    calls = [0]
    forward = dictionary._ComposeBlockMajor.forward

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    monkeypatch.setattr(dictionary._ComposeBlockMajor, 'forward', staticmethod(counted))
    return calls


@pytest.mark.parametrize('ckpt', [False, True], ids=['plain', 'grad_checkpointing'])
def test_batched_composition_once_per_step_and_released(ckpt, monkeypatch, tiny_kwargs):
    """One composition per dictionary per training step, also under gradient checkpointing (the recomputed blocks
    reuse it); the backward pass releases it, and an optimizer step invalidates it."""
    calls = _count_compositions(monkeypatch)
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs, groups=2)
    m.set_grad_checkpointing(ckpt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        m(x).logsumexp(-1).mean().backward()
        assert calls[0] == 2 * (step + 1)  # two groups: two dictionaries
        assert all(d._composed is None for d in m.dictionaries)  # released by the backward pass
        opt.step()
    out = m(x)
    assert calls[0] == 6 and all(d._composed is not None for d in m.dictionaries)
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)
    assert calls[0] == 6  # no backward and no change: reused
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradients: parameters unchanged, but the step count invalidates (fused optimizers bump nothing)
    torch.testing.assert_close(m(x), out, rtol=0, atol=0)
    assert calls[0] == 8


def test_batched_composition_two_forwards_accumulation_reentrant_deepcopy(tiny_kwargs):
    """Two forwards sharing one composition, gradient accumulation over two backward passes (the second forward
    composes again: the first graph is spent), reentrant checkpointing, and a deep copy (timm's ModelEmaV3) taken
    while a composition is alive."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    x = torch.randn(2, 3, 32, 32)
    ref = _grads(m, lambda model: model(x).square().mean())
    twice = _grads(m, lambda model: model(x).square().mean() + model(x).square().mean())
    m.zero_grad(set_to_none=True)
    for _ in range(2):
        m(x).square().mean().backward()
    accumulated = {n: p.grad for n, p in m.named_parameters()}

    def reentrant(model):
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=True)
        return model.forward_head(model.norm(h)).square().mean()

    g_reentrant = _grads(m, reentrant)
    for n in ref:
        torch.testing.assert_close(twice[n], 2 * ref[n], msg=n)
        torch.testing.assert_close(accumulated[n], 2 * ref[n], msg=n)
        torch.testing.assert_close(g_reentrant[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    out = m(x)  # a composition is alive (no backward yet)
    ema = ModelEmaV3(m)
    assert all(d._composed is None for d in ema.module.dictionaries)
    torch.testing.assert_close(ema.module(x), out)


def test_batched_composition_follows_requires_grad_and_functional_call(tiny_kwargs):
    """A composition made while the atoms were frozen carries no graph: unfreezing must compose again, or the atoms
    would get no gradient. torch.func.functional_call swaps the parameters: the swapped-in values must be used."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    x = torch.randn(2, 3, 32, 32)
    for p in m.dictionaries.parameters():
        p.requires_grad_(False)
    m(x).sum().backward()
    for p in m.dictionaries.parameters():
        p.requires_grad_(True)
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.dictionaries.parameters())
    out = m(x)  # a live composition of the real parameters
    params = {n: p.detach() * 0.5 if n.startswith('dictionaries') else p for n, p in m.named_parameters()}
    swapped = torch.func.functional_call(m, params, (x,))
    ref = _per_block_copy(m)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(params[n])
    torch.testing.assert_close(swapped, ref(x), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(swapped, out)


# ---------------------------------------------------------------------------------------------------------------
# DDP (gloo, 2 processes on CPU): shared atoms get the same gradients as one process on the whole batch
# ---------------------------------------------------------------------------------------------------------------

DDP_CONFIGS = [dict(), dict(coef='mlp', groups=2)]
DDP_BATCH = 4


def _ddp_reference(tiny_kwargs, opts, ckpt):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs, **opts)
    m.set_grad_checkpointing(ckpt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(DDP_BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, tiny_kwargs['num_classes'], (DDP_BATCH,), generator=g)
    return m, x, y


def _ddp_step(model, ddp_model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(ddp_model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    ddp_model.eval()
    with torch.no_grad():
        ddp_model(x)  # builds the eval cache
        out = ddp_model(x)  # uses it
    return grads, out


def _ddp_worker(rank, world, port, tiny_kwargs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        results = []
        for opts in DDP_CONFIGS:
            for ckpt in (False, True):
                m, x, y = _ddp_reference(tiny_kwargs, opts, ckpt)
                per = DDP_BATCH // world
                ddp = torch.nn.parallel.DistributedDataParallel(m)
                grads, _ = _ddp_step(m, ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
                with torch.no_grad():
                    out = m(x)  # the whole batch, cached weights, after the step
                results.append(dict(grads=grads, out=out))
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tiny_kwargs):
    """DDP over shared atoms (used by every block, registered once): the averaged half-batch gradients equal the
    whole-batch gradients of one process, with and without grad checkpointing, and the models stay identical."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_kwargs, d), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(d, f'rank{r}.pt')) for r in range(2)]
    i = 0
    for opts in DDP_CONFIGS:
        for ckpt in (False, True):
            m, x, y = _ddp_reference(tiny_kwargs, opts, ckpt)
            grads, _ = _ddp_step(m, m, x, y)
            with torch.no_grad():
                out = m(x)
            for r in ranks:
                got = r[i]
                assert set(got['grads']) == set(grads)
                for n, g in grads.items():
                    torch.testing.assert_close(got['grads'][n], g, atol=1e-6, rtol=1e-4, msg=f'{opts} ckpt={ckpt} {n}')
                torch.testing.assert_close(got['out'], out, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ranks[0][i]['out'], ranks[1][i]['out'], rtol=0, atol=0)
            i += 1


# ---------------------------------------------------------------------------------------------------------------
# Eval cache: same arithmetic as dense
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('opts', VARIANTS, ids=_id)
def test_cached_eval_is_bitwise_the_dense_export(opts, tiny_kwargs):
    """The cached weights are contiguous and give the exported dense model's outputs bit for bit."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, depth=4), **opts).eval()
    dense = masa_vit.to_dense(m).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out, dense(x), rtol=0, atol=0)
        torch.testing.assert_close(m(x), _uncached(m, x), rtol=0, atol=0)
    for layer in _atom_linears(m):
        assert layer.cached_weight is not None and layer.cached_weight.is_contiguous()


def test_cached_eval_under_cpu_autocast_matches_dense_export(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    dense = masa_vit.to_dense(m).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(x)
        out2 = m(x)
        ref = dense(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)


def test_fp32_eval_after_autocast_eval(tiny_kwargs):
    """Validation under AMP, then a plain fp32 eval call (no train() in between): fp32 weights, fp32 result."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            m(x)
        out = m(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _uncached(m, x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Eval cache: never used with autograd, rebuilt whenever the weights change
# ---------------------------------------------------------------------------------------------------------------

def test_eval_mode_with_grad_bypasses_cache_and_trains(tiny_kwargs):
    """A populated cache must not cut the graph: eval mode + grad gives the same gradients as train mode (no
    dropout in these models), and training mode never populates the cache."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    x = torch.randn(2, 3, 32, 32)
    m(x).square().mean().backward()
    assert all(layer.cached_weight is None for layer in _atom_linears(m))
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.eval()
    with torch.no_grad():
        m(x)
    cached = {id(layer): layer.cached_weight for layer in _atom_linears(m)}
    w = _atom_linears(m)[0].composed_weight()
    assert w.requires_grad and w is not cached[id(_atom_linears(m)[0])]
    m(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=0, msg=n)


def test_inference_mode(tiny_kwargs):
    """inference_mode uses the cache like no_grad, bit for bit; its inference tensors never leak into autograd."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    m.clear_cache()
    with torch.inference_mode():
        out = m(x)  # cache built under inference_mode
        out2 = m(x)
    with torch.no_grad():
        out3 = m(x)  # and reused under no_grad
    for o in (out, out2, out3):
        torch.testing.assert_close(o, ref, rtol=0, atol=0)
    # autograd after inference_mode: eval + grad and train both work (the cached inference tensor is bypassed)
    m(x).sum().backward()
    m.train()
    m(x).sum().backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    m.eval()
    with torch.inference_mode():
        after = m(x)
    torch.testing.assert_close(after, _uncached(m, x), rtol=0, atol=0)
    assert (after - ref).abs().max() > 1e-4


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_cache_follows_dtype_moves(dtype, tiny_kwargs):
    """.to(dtype) and back: each eval call uses weights of the current dtype and values."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m.to(dtype)
        out = m(x.to(dtype))
        assert out.dtype == dtype
        assert all(layer.cached_weight.dtype == dtype for layer in _atom_linears(m))
        torch.testing.assert_close(out, _uncached(m, x.to(dtype)), rtol=0, atol=0)
        m.to(torch.float32)
        back = m(x)
        assert back.dtype == torch.float32
        torch.testing.assert_close(back, _uncached(m, x), rtol=0, atol=0)
        if dtype == torch.float64:  # float32 -> float64 -> float32 is exact
            torch.testing.assert_close(back, ref, rtol=0, atol=0)


@pytest.mark.parametrize('opt_kwargs', [
    dict(foreach=False),
    dict(foreach=True),
    dict(fused=True),  # fused AdamW does not bump version counters: the cache also counts optimizer steps
], ids=lambda k: ','.join(k))
def test_cache_invalidated_by_adamw_step_in_eval_mode(opt_kwargs, tiny_kwargs):
    """Training in eval mode (no dropout) with an eval call before and after the step: the second sees the update."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs).eval()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, **opt_kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
    m(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = m(x)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, _uncached(m, x), rtol=0, atol=0)


@pytest.mark.parametrize('foreach', [True, False])
def test_cache_invalidated_by_ema_update(foreach, tiny_kwargs):
    """timm's ModelEmaV3 (lerp into the EMA copy's state dict tensors): the EMA model's cache follows."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **tiny_kwargs)
    ema = ModelEmaV3(m, decay=0.5, foreach=foreach)
    ema.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = ema(x)
        for p in m.parameters():
            p.add_(0.05)
    ema.update(m, step=100)
    with torch.no_grad():
        after = ema(x)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, _uncached(ema.module, x), rtol=0, atol=0)


def test_fold_coefficients_invalidates_cache(tiny_kwargs):
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', coef='mlp', **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m.fold_coefficients()
        assert all(layer.cached_weight is None for layer in _atom_linears(m))
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
        # the folded coefficients are new tensors: an update to them must reach the cached weights
        m.dictionaries[0].coef.mul_(2.0)
        torch.testing.assert_close(m(x), _uncached(m, x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Eval cache: one check per forward pass (SharedWeightBlocks)
# ---------------------------------------------------------------------------------------------------------------

def _pass_weight(layer):
    """The weight SharedWeightBlocks handed `layer` for the eval pass in progress, or None."""
    slot = layer._slot
    return slot[0][0][slot[1]] if slot is not None and slot[0][0] is not None else None


def _depends_on(name):
    """Parameters a composed weight depends on, plus the first block's qkv bias (added by F.linear)."""
    return 'dictionaries' in name or name.startswith('blocks.0.attn.qkv.')


@pytest.mark.parametrize('opts', [
    dict(), dict(share='qk'), dict(refine_rank=2), dict(coef='mlp'), dict(share='qkvo+mlp'), dict(groups=2),
], ids=_id)
def test_one_check_per_pass_follows_in_place_edits(opts, tiny_kwargs):
    """The blocks validate every layer's cached weight once per forward pass; the layers use it during the pass and
    check for themselves again after it. An in-place edit of any tensor a weight depends on (atoms, coefficients, a
    block's own weight or low-rank term) between two passes reaches the next pass and a direct block call."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, depth=4), **opts).eval()
    assert isinstance(m.blocks, masa_vit.SharedWeightBlocks)
    qkv = m.blocks[1].attn.qkv
    seen = []
    qkv.register_forward_pre_hook(lambda mod, args: seen.append(_pass_weight(mod)))
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.randn(2, 5, m.embed_dim)
    names = [n for n, _ in m.named_parameters() if _depends_on(n)]
    assert len(names) >= 3
    with torch.no_grad():
        m(x)
        assert seen[-1] is not None and seen[-1] is qkv.cached_weight  # validated by the pass
        assert all(_pass_weight(layer) is None for layer in _atom_linears(m))  # released after it
        m.blocks[1](tokens)
        assert seen[-1] is None  # a direct block call checks for itself
        params = dict(m.named_parameters())
        for n in names:
            params[n].mul_(1.5)
            torch.testing.assert_close(m(x), _uncached(m, x), rtol=0, atol=0, msg=n)
            dense = masa_vit.to_dense(m).eval()
            torch.testing.assert_close(m.blocks[0](tokens), dense.blocks[0](tokens), rtol=0, atol=0, msg=n)


def test_one_check_per_pass_released_after_an_error(tiny_kwargs):
    m = timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, depth=4)).eval()

    def fail(mod, args):
        raise RuntimeError('hook failure')

    handle = m.blocks[2].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match='hook failure'):
        m(torch.randn(1, 3, 32, 32))
    assert all(_pass_weight(layer) is None for layer in _atom_linears(m))
    handle.remove()
    sliced = m.blocks[:2]  # timm's prune_intermediate_layers slices the blocks
    assert isinstance(sliced, masa_vit.SharedWeightBlocks) and len(sliced) == 2
    # the slice and the whole model share layers: each pass hands out its own weights, both stay exact
    x, tokens = torch.randn(1, 3, 32, 32), torch.randn(1, 5, m.embed_dim)
    dense = masa_vit.to_dense(m).eval()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(sliced(tokens), dense.blocks[:2](tokens), rtol=0, atol=0)
            torch.testing.assert_close(m(x), dense(x), rtol=0, atol=0)


@pytest.mark.parametrize('opts', [dict(), dict(share='qk'), dict(refine_rank=2)], ids=_id)
def test_functional_call_in_eval_uses_swapped_parameters(opts, tiny_kwargs):
    """torch.func.functional_call swaps parameters for one call: a warm eval cache must not answer for the swapped-in
    tensors (it once did: the check followed the cached tensors, not the ones looked up now), and the model's own
    cache is intact afterwards."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', **dict(tiny_kwargs, depth=4), **opts).eval()
    x = torch.randn(2, 3, 32, 32)
    swapped = {n: p * 1.5 if _depends_on(n) else p for n, p in m.named_parameters()}
    ref = copy.deepcopy(m)
    ref.load_state_dict(swapped, strict=False)
    with torch.no_grad():
        before = m(x)
        out = torch.func.functional_call(m, swapped, (x,))
        torch.testing.assert_close(out, _uncached(ref, x), rtol=0, atol=0)
        assert (out - before).abs().max() > 1e-4
        torch.testing.assert_close(m(x), before, rtol=0, atol=0)


def test_compiled_eval_sees_parameter_updates(tiny_kwargs):
    """torch.compile traces the composition (no cache inside a graph): a compiled eval model follows an
    optimizer step on the eager parameters instead of keeping weights baked in at compile time."""
    torch.manual_seed(0)
    m = timm.create_model('masa_vit_tiny', num_atoms=1, **dict(tiny_kwargs, depth=2)).eval()
    compiled = torch.compile(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = compiled(x)
        torch.testing.assert_close(before, _uncached(m, x), atol=1e-5, rtol=1e-5)
    assert all(layer.cached_weight is None for layer in _atom_linears(m))  # the cache stays out of compiled graphs
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = compiled(x)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, _uncached(m, x), atol=1e-5, rtol=1e-5)
