""" The conversion benchmark's pieces for a headless pretrained backbone (benchmarks/bench_conversion.py): the linear
probe on digits at the model's input size, the feature-fidelity metrics and the natural-image crops, on a tiny
random-init timm DINOv2-shaped ViT (num_classes=0, LayerScale, patch 14). No accuracy is asserted beyond the probe
reproducing scikit-learn's classifier.
"""
import argparse

import numpy as np
import pytest
import timm
import torch

from masa_vit.conversion import from_dense, svd_from_dense


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def bench(load_script):
    return load_script('benchmarks/bench_conversion.py')


def _headless(img_size=28):
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=img_size, depth=3,
                              embed_dim=32, num_heads=2, num_classes=0).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: the blocks would barely change the features (some with
        for blk in model.blocks:  # std ~1e-6, whose probe weights float32 cannot hold to 1e-4)
            blk.ls1.gamma.fill_(1.0)
            blk.ls2.gamma.fill_(1.0)
    return model


def _args(out, **kw):
    args = dict(batch_size=64, probe_images=200, calib_images=16, eval_images=40, calib_source='digits',
                linear_probe=False, seed=0, out=str(out), retrain=False)
    args.update(kw)
    return argparse.Namespace(**args)


def test_digits_at_size_and_natural_crops(bench):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, y = bench.digits_at_size('val', 28, mean, std, limit=10, seed=1)
    assert x.shape == (10, 3, 28, 28) and y.shape == (10,)
    x01 = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    crops = bench.natural_crops(3, 28, mean, std, seed=0)
    assert crops.shape == (3, 3, 28, 28) and torch.isfinite(crops).all()
    assert torch.equal(crops, bench.natural_crops(3, 28, mean, std, seed=0))


def test_linear_probe_is_sklearns_classifier(bench):
    """The installed head (standardization folded in) gives scikit-learn's class probabilities."""
    from sklearn.linear_model import LogisticRegression
    dense = _headless()
    x, y = bench.digits_at_size('train', 28, (0.5,) * 3, (0.25,) * 3, limit=120)
    feats, logits = bench.pooled_features(dense, [x])
    assert logits.shape == feats.shape == (120, 32)  # no head yet: Identity
    info = bench.fit_linear_probe(dense, [(x, y)], num_classes=10)  # one batch: the same features bit for bit
    assert dense.num_classes == 10 and dense.head.weight.shape == (10, 32)
    f = feats.double()
    mu, sigma = f.mean(0), f.std(0)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(((f - mu) / sigma).numpy(), y.numpy())
    with torch.no_grad():
        probs = torch.softmax(dense(x).double(), -1).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(((f - mu) / sigma).numpy()), atol=1e-4)
    assert info['train_top1'] == pytest.approx(clf.score(((f - mu) / sigma).numpy(), y.numpy()), abs=1e-2)


def test_headless_setup_then_conversion_and_metrics(bench, tmp_path):
    """Probe installed on the dense model before conversion, so the converted models share it (and cached in the
    output folder); the evaluator reports the logits metrics and the feature fidelity on digits and natural crops."""
    dense = _headless()
    dense, calib, val, setup = bench.headless_digits_setup(dense, _args(tmp_path))
    assert setup['probe']['train_images'] == 200 and setup['eval_images'] == 40
    again = bench.headless_digits_setup(_headless(), _args(tmp_path))
    assert torch.equal(again[0].head.weight, dense.head.weight) and again[3]['probe']['cached']
    assert sum(len(b[0]) for b in calib) == 16 and calib[0][0].shape[-1] == 28
    natural = bench.batches(bench.natural_crops(4, 28, setup['mean'], setup['std']), None, 64)
    evaluator = bench.Evaluator(dense, val, natural)
    same = evaluator(dense)
    assert same['agreement'] == 1 and same['mean_kl'] == pytest.approx(0, abs=1e-12)
    assert same['feat_cos'] == pytest.approx(1) and same['natural_feat_rel_l2'] == pytest.approx(0, abs=1e-6)
    for model in (from_dense(dense, 0.3, calib=calib), svd_from_dense(dense, 0.3)):
        assert torch.equal(model.head.weight, dense.head.weight)
        ev = evaluator(model)
        assert {'top1', 'agreement', 'mean_kl', 'feat_cos', 'feat_rel_l2', 'natural_feat_cos',
                'natural_feat_rel_l2'} <= set(ev)
        assert -1 <= ev['feat_cos'] <= 1 + 1e-9 and ev['feat_rel_l2'] >= 0


def test_natural_calibration_and_row_selection(bench, tmp_path):
    dense = _headless()
    _, calib, _, setup = bench.headless_digits_setup(dense, _args(tmp_path, calib_source='natural', probe_images=100))
    assert isinstance(calib[0], torch.Tensor) and calib[0].shape == (16, 3, 28, 28)
    assert setup['calib'] == '16 natural images'
    _, calib, _, setup = bench.headless_digits_setup(dense, _args(tmp_path, calib_source='mixed', probe_images=100))
    assert len(calib) == 1 and calib[0].shape == (16, 3, 28, 28) and setup['calib'] == '16 mixed images'
    args = bench.parse_args(['--rows', 'svd', 'mpca_refine_seq'])
    assert args.rows == ['svd', 'mpca_refine_seq']
    assert 'joint_rounds' not in bench.default_rows(bench.parse_args([]))
    assert 'mpca' not in bench.default_rows(bench.parse_args(['--no-old-rows']))
