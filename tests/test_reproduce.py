""" The reproduction harness (masa_vit.reproduce): a tiny grid runs end to end through the training script, writes the
CSV / table / plot, skips finished cells, reruns only an interrupted one, and refuses bad grids with clear errors.

Every cell is a real training subprocess (1 epoch of a tiny model on the bundled digits); the whole file runs in about a
minute on 2 cores.
"""
import copy
import csv
import json
import os

import pytest
import yaml

from masa_vit import reproduce
from masa_vit.reproduce import GridError, run_grid

GRIDS_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs', 'grids')

TINY_GRID = dict(
    name='tiny',
    seeds=[0, 1],
    threads=1,
    jobs=2,  # two one-thread runs at a time, as on the digits grid
    num_atoms=['L/2'],
    train=dict(batch_size=256, epochs=1, lr=2e-3, warmup_epochs=0, workers=0, tensorboard=False, coef_log_interval=0,
               checkpoint_hist=1, log_interval=100, hflip=0.0, color_jitter=0.0, scale=[0.7, 1.0]),
    datasets=dict(digits=dict(dataset='digits', num_classes=10, img_size=32, crop_pct=1.0)),
    models=dict(tiny=dict(model='masa_vit_nano_patch4_32',
                          model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, mlp_ratio=2.0))),
    methods={'dense': dict(sharing='dense'), 'MASA-QKVO': dict(sharing='masa', share='qkvo')},
)


def _write(tmp_path, grid, name='grid.yaml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


def _launches(output):
    """Training launches per cell folder (one line per launch in attempts.jsonl)."""
    out = {}
    for name in os.listdir(os.path.join(output, 'cells')):
        path = os.path.join(output, 'cells', name, 'attempts.jsonl')
        out[name] = sum(1 for _ in open(path)) if os.path.exists(path) else 0
    return out


def test_tiny_grid_runs_resumes_and_reruns_only_the_interrupted_cell(tmp_path):
    output = str(tmp_path / 'out')
    grid_path = _write(tmp_path, TINY_GRID)
    result = run_grid(grid_path, output=output)
    assert set(result['statuses'].values()) == {'done'}, result['statuses']

    # CSV: one row per run with the budget of its method
    with open(os.path.join(output, 'runs.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert sorted((r['method'], r['seed']) for r in rows) == [
        ('MASA-QKVO', '0'), ('MASA-QKVO', '1'), ('dense', '0'), ('dense', '1')]
    for r in rows:
        assert r['status'] == 'done' and 0 <= float(r['top1']) <= 100 and float(r['wall_time_s']) > 0
        assert r['epochs'] == '1'
        if r['method'] == 'dense':
            assert float(r['attention_compression']) == 0 and r['S'] == ''
        else:
            assert r['S'] == '1' and 0.4 < float(r['attention_compression']) < 0.5  # S = L/2: about half
            assert int(r['params']) < int(next(d for d in rows if d['method'] == 'dense')['params'])
    # markdown: one row per method with mean +- std over the 2 seeds; the plot is a PNG
    md = open(os.path.join(output, 'results.md')).read()
    assert '| dense | - | 0.0% |' in md and '| MASA-QKVO | 1 |' in md and md.count('2/2') == 2
    assert '+-' in md
    with open(os.path.join(output, 'results.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    # each cell's config is a complete training config
    cell_dirs = sorted(os.listdir(os.path.join(output, 'cells')))
    cell_cfg = yaml.safe_load(open(os.path.join(output, 'cells', cell_dirs[0], 'cell.yaml')))
    assert cell_cfg['dataset'] == 'digits' and cell_cfg['epochs'] == 1 and 'seed' in cell_cfg

    # rerun: nothing trains again, the results stay as they are
    launches = _launches(output)
    assert set(launches.values()) == {1}
    mtimes = {d: os.path.getmtime(os.path.join(output, 'cells', d, 'result.json')) for d in cell_dirs}
    result = run_grid(grid_path, output=output)
    assert set(result['statuses'].values()) == {'done'}
    assert _launches(output) == launches
    assert mtimes == {d: os.path.getmtime(os.path.join(output, 'cells', d, 'result.json')) for d in cell_dirs}

    # an interrupted grid: one cell lost its result (and its checkpoints): only that cell runs again
    victim = cell_dirs[1]
    top1_before = json.load(open(os.path.join(output, 'cells', victim, 'result.json')))['top1']
    os.remove(os.path.join(output, 'cells', victim, 'result.json'))
    for name in os.listdir(os.path.join(output, 'cells', victim, 'train')):
        if name.endswith('.pth.tar'):
            os.remove(os.path.join(output, 'cells', victim, 'train', name))
    statuses = run_grid(grid_path, output=output, dry_run=True)['statuses']
    assert sorted(statuses.values()) == ['done', 'done', 'done', 'pending']
    run_grid(grid_path, output=output)
    after = _launches(output)
    assert after == dict(launches, **{victim: 2})
    top1_after = json.load(open(os.path.join(output, 'cells', victim, 'result.json')))['top1']
    assert top1_after == top1_before  # same seed, same config: the same run
    assert {d: os.path.getmtime(os.path.join(output, 'cells', d, 'result.json')) for d in cell_dirs if d != victim} \
        == {d: m for d, m in mtimes.items() if d != victim}

    # a changed recipe is a new set of cells; extra seeds add cells and keep the finished ones
    cells3 = run_grid(grid_path, output=output, seeds=[0, 1, 2], dry_run=True)['statuses']
    assert sorted(cells3.values()) == ['done'] * 4 + ['pending'] * 2


def test_a_failing_cell_is_recorded_and_reported_not_dropped(tmp_path):
    grid = copy.deepcopy(TINY_GRID)
    grid['seeds'] = [0]
    grid['methods'] = {'dense': dict(sharing='dense')}
    grid['train']['batch_size'] = 4096  # more than the 1,437 training images: the training script refuses
    output = str(tmp_path / 'out')
    result = run_grid(_write(tmp_path, grid), output=output)
    assert list(result['statuses'].values()) == ['failed']
    rows = list(csv.DictReader(open(os.path.join(output, 'runs.csv'))))
    assert len(rows) == 1 and rows[0]['status'] == 'failed' and 'batch' in rows[0]['error']
    md = open(os.path.join(output, 'results.md')).read()
    assert '0/1 (1 failed)' in md and '## Failed runs' in md
    assert reproduce.main(['--grid', _write(tmp_path, grid), '--output', output, '--report-only']) == 1


@pytest.mark.parametrize('change, message', [
    (dict(bogus=1), "unknown key 'bogus'"),
    (dict(train=dict(epoch=1)), "unknown training flag 'epoch' (did you mean 'epochs'?)"),
    (dict(methods={'mystery': dict(sharing='magic')}), "unknown method sharing='magic'"),
    (dict(methods={'MASA': dict(sharing='masa', atoms=2)}), "unknown sharing option 'atoms'"),
    (dict(methods={'MASA': dict(sharing='masa', num_atoms=9)}), 'num_atoms=9 is out of range'),
    (dict(train=dict(seed=3)), "'seed' is set by the harness"),
    (dict(num_atoms=['half']), "num_atoms entries must be positive integers or 'L/k'"),
    (dict(train=dict(opt_betas='x')), 'opt_betas must be a number'),
    (dict(datasets=dict(digits=dict(dataset='digits'))), 'num_classes is not set'),
])
def test_bad_grids_give_clear_errors(tmp_path, change, message):
    grid = copy.deepcopy(TINY_GRID)
    for key, value in change.items():
        if key == 'train':
            grid['train'].update(value)
        else:
            grid[key] = value
    with pytest.raises(GridError, match=None) as info:
        run_grid(_write(tmp_path, grid), output=str(tmp_path / 'out'), dry_run=True)
    assert message in str(info.value)
    with pytest.raises(SystemExit, match='error: '):
        reproduce.main(['--grid', _write(tmp_path, grid), '--dry-run'])
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('name', sorted(n for n in os.listdir(GRIDS_DIR) if n.endswith('.yaml')))
def test_shipped_grids_expand_with_the_paper_budgets(name):
    result = run_grid(os.path.join(GRIDS_DIR, name), dry_run=True)
    cells = result['cells']
    assert cells and len({c.cell_id for c in cells}) == len(cells)
    def plain(c):  # the paper's MASA-QKVO layout: four separate dictionaries, direct coefficients
        kw = c.config['model_kwargs']
        return kw.get('share', 'qkvo') == 'qkvo' and kw.get('dictionary', 'separate') == 'separate' and \
            kw.get('coef', 'direct') == 'direct'

    reference = {(c.dataset, c.model, c.S): c.counts['attention_compression'] for c in cells
                 if c.sharing == 'masa' and plain(c)}
    for c in cells:
        comp = c.counts['attention_compression']
        if c.sharing == 'dense':
            assert comp == 0
        elif c.sharing in ('masa', 'sequential', 'cycle', 'low_rank') and plain(c):
            # MASA's budget, 1 - S / L up to biases and coefficients; the baselines within 1.5 points of MASA-QKVO
            # at the same S (low rank: the rank is rounded to an integer)
            assert abs(comp - (1 - c.S / c.depth)) < 0.025, c.label
            assert abs(comp - reference[(c.dataset, c.model, c.S)]) < 0.015, c.label
        elif c.sharing == 'gqa':
            assert 0 < comp < 0.5  # K and V shrink to kv / heads: GQA's own, smaller compression
    if name == 'digits.yaml':
        assert len(cells) == 21 and [c.method for c in cells[:7]] == [
            'dense', 'MASA-QKVO', 'MASA-QKV', 'low-rank', 'sequential', 'cycle', 'GQA']
        assert all(c.config['epochs'] == cells[0].config['epochs'] for c in cells)

