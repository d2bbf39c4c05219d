""" Smoke tests of the speed benchmark (benchmarks/bench_speed.py): it runs end to end on a tiny case and writes
JSON + markdown, and the timed MASA eval runs hit the weight cache. No timing is asserted (benchmarks, not tests).
"""
import json

import pytest


@pytest.fixture(scope='module')
def bench_run(tmp_path_factory, load_script):
    bench = load_script('benchmarks/bench_speed.py')
    out = tmp_path_factory.mktemp('bench')
    json_path, md_path = str(out / 'r.json'), str(out / 'r.md')
    try:
        bench.main([
            '--models', 'masa_vit_nano_patch4_32', '--batch-sizes', '2', '--modes', 'train,eval',
            '--repeats', '2', '--eval-repeats', '2', '--warmup', '1', '--min-run-s', '0', '--threads', '1',
            '--no-memory', '--no-conversions', '--no-profile', '--out', json_path, '--markdown', md_path])
    finally:
        bench.AtomLinear._compose = bench._compose  # undo the benchmark's counting wrapper
    with open(json_path) as f:
        return json.load(f), open(md_path).read()


def test_bench_speed_writes_ratios(bench_run):
    results, md = bench_run
    cases = {(r['mode'], r['batch_size']): r for r in results['speed']}
    assert set(cases) == {('train', 2), ('eval', 2)}
    for r in cases.values():
        assert r['ratio'] == pytest.approx(r['masa']['median'] / r['dense']['median'])
        assert r['masa']['n'] == 2 and r['dense']['n'] == 2
    # the MASA model has fewer parameters than its twin, counted the model's way
    train = cases[('train', 2)]
    assert train['params']['masa']['attention'] < train['params']['dense']['attention']
    assert '| masa_vit_nano_patch4_32 | eval | 2 |' in md


def test_bench_speed_eval_hits_cache_and_has_control_arms(bench_run):
    results, md = bench_run
    r = next(r for r in results['speed'] if r['mode'] == 'eval')
    assert r['compose_calls'] == 0  # every timed MASA eval call reused the cached weights
    for key in ('control_ratio', 'masa_over_control', 'aa_ratio', 'aa_paired'):
        assert r[key] > 0
    assert 'A/A ratio' in md
