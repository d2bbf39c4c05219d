""" Smoke tests of the speed benchmark (benchmarks/bench_speed.py): it runs end to end on a tiny case and writes
JSON + markdown, and the timed MASA eval runs hit the weight cache, in the benchmark's process and in isolated timing
processes. No timing is asserted (benchmarks, not tests).
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
    # training cases on CPU time each arm in its own process by default; eval cases in the benchmark's process
    assert train['isolated'] is True and cases[('eval', 2)]['isolated'] is False
    for arm in ('masa', 'dense'):
        assert train[arm]['faults_per_step'] >= 0 and len(train[arm]['times']) == 2
        assert set(train[arm]['parts']) == {'fwd', 'bwd', 'opt'}


def test_bench_speed_isolated_arms_report_from_their_processes(tmp_path, load_script):
    bench = load_script('benchmarks/bench_speed.py')
    json_path = str(tmp_path / 'r.json')
    common = ['--models', 'masa_vit_nano_patch4_32', '--batch-sizes', '2', '--repeats', '2', '--eval-repeats', '2',
              '--warmup', '0', '--min-run-s', '0', '--threads', '1', '--no-memory', '--no-conversions',
              '--no-profile', '--out', json_path]
    try:
        with pytest.raises(SystemExit, match='--isolate'):
            bench.main(common + ['--modes', 'eval', '--malloc', 'keep'])
        bench.main(common + ['--modes', 'eval', '--isolate', '--malloc', 'keep'])
    finally:
        bench.AtomLinear._compose = bench._compose
    with open(json_path) as f:
        r = json.load(f)['speed'][0]
    assert r['isolated'] is True and r['malloc'] == 'keep'
    # the compositions are counted in the MASA arm's own process: its timed eval runs hit the cache there too
    assert r['compose_calls'] == 0
    # every arm ran in its process and reported its parameter count; the control arm (to_dense of the MASA model,
    # rebuilt from the seed in its process) has the MASA model's attention weights as dense matrices
    assert r['params']['masa']['attention'] < r['params']['dense']['attention']
    assert r['params']['control'] == r['params']['dense'] == r['params']['dense_copy']
    for arm in ('masa', 'dense', 'control', 'dense_copy'):
        assert r[arm]['n'] == 2 and r[arm]['faults_per_step'] >= 0


def test_bench_speed_eval_hits_cache_and_has_control_arms(bench_run):
    results, md = bench_run
    r = next(r for r in results['speed'] if r['mode'] == 'eval')
    assert r['compose_calls'] == 0  # every timed MASA eval call reused the cached weights
    for key in ('control_ratio', 'masa_over_control', 'aa_ratio', 'aa_paired'):
        assert r[key] > 0
    assert 'A/A ratio' in md
