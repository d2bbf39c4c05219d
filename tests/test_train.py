""" Training: outputs, evaluation JSON, exact resume (SIGTERM mid-epoch), DDP == 1 process, fine-tuning, bad input

Everything runs on CPU with a tiny MASA ViT (2 blocks, width 32, 16 tokens) on the bundled digits dataset.
"""
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import yaml
from PIL import Image

import masa_vit
from masa_vit.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint_file, save_atomic
from masa_vit.data import DigitsDataset
from masa_vit.train import _parse_args, main, validate_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'masa_vit_nano_patch4_32'
TINY = ['depth=2', 'embed_dim=64', 'num_heads=2', 'patch_size=8', 'num_atoms=1']
MEAN_STD = ['--mean', '0.3', '0.3', '0.3', '--std', '0.3', '0.3', '0.3']


def tiny_argv(output, *extra, epochs=2, model_kwargs=TINY):
    return [
        '--dataset', 'digits', '--model', MODEL, '--model-kwargs', *model_kwargs, *MEAN_STD, '--crop-pct', '1.0',
        '-b', '32', '--workers', '0', '--epochs', str(epochs), '--lr', '2e-3', '--warmup-epochs', '0',
        '--min-lr', '1e-5', '--hflip', '0', '--color-jitter', '0', '--scale', '0.7', '1.0', '--log-interval', '5',
        '--threads', '1', '--no-progress', '--output', str(output), *extra]


def read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """A 2-epoch run with EMA, shared by the tests that need a finished run."""
    out = tmp_path_factory.mktemp('run')
    result = main(tiny_argv(out, '--model-ema', '--model-ema-decay', '0.9'))
    return out, result


def test_training_writes_summary_checkpoints_config_and_tensorboard(trained_run):
    out, result = trained_run
    assert not result['interrupted'] and result['top1'] > 20  # chance is 10
    rows = read_summary(out / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for key in ('train_loss', 'eval_top1', 'eval_top5', 'eval_loss', 'eval_ema_top1', 'lr'):
        assert key in rows[0]
    losses = [float(r['train_loss']) for r in rows]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert float(rows[1]['eval_top1']) == pytest.approx(result['top1'])

    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'rng_state', 'args', 'masa_kwargs'):
        assert key in ckpt
    assert ckpt['epoch'] == 1 and ckpt['resume_epoch'] == 2 and ckpt['resume_batch'] == 0
    assert ckpt['masa_kwargs']['num_atoms'] == 1 and ckpt['masa_kwargs']['sharing'] == 'masa'
    assert (out / 'model_best.pth.tar').exists()
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]

    # the resolved config is a valid config file that resolves to the same values
    args, config = _parse_args(['--config', str(out / 'args.yaml')])
    assert config == yaml.safe_load(open(out / 'args.yaml'))
    assert args.model_kwargs['embed_dim'] == 64

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out), size_guidance={'images': 0, 'scalars': 0, 'histograms': 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'train/img_per_sec', 'val/top1', 'val/top5',
                'val/loss', 'val_ema/top1', 'model/attention', 'model/attention_compression', 'model/total'):
        assert tag in tags['scalars'], tag
    assert ea.Scalars('model/attention_compression')[0].value == pytest.approx(
        ckpt_compression(ckpt), rel=1e-6)
    for kind in 'qkvo':
        assert f'masa_coefficients_hist/{kind}' in tags['histograms']
    heatmaps = ea.Images('masa_coefficients/all')  # q, k, v, o side by side
    assert len(heatmaps) == 3  # at start and after each epoch
    assert heatmaps[-1].height > 100 and heatmaps[-1].width > 300  # a drawn figure, not a 2x1 grey tensor


def ckpt_compression(ckpt):
    model = timm.create_model(MODEL, num_classes=10, **ckpt['model_kwargs'])
    return masa_vit.count_params(model)['attention_compression']


def test_eval_only_json_matches_a_recomputed_top1(trained_run, tmp_path):
    out, _ = trained_run
    result = main(tiny_argv(tmp_path, '--eval-only', '--resume', str(out / 'last.pth.tar')))
    with open(tmp_path / 'eval_results.json') as f:
        saved = json.load(f)
    for key in ('top1', 'top5', 'loss', 'param_count', 'attention_params', 'attention_compression', 'img_per_sec'):
        assert saved[key] == pytest.approx(result[key])

    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)
    model = timm.create_model(MODEL, num_classes=10, **ckpt['model_kwargs'])
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    transform = timm.data.create_transform(
        (3, 32, 32), is_training=False, crop_pct=1.0, mean=(0.3,) * 3, std=(0.3,) * 3, interpolation='bilinear')
    dataset = DigitsDataset('val', transform=transform)
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        pred = model(x).argmax(-1)
    top1 = 100. * (pred == torch.tensor(dataset.targets)).float().mean().item()
    assert saved['top1'] == pytest.approx(top1, abs=1e-6)
    counts = masa_vit.count_params(model)
    assert saved['param_count'] == counts['total'] and saved['attention_params'] == counts['attention']
    assert 0 < saved['attention_compression'] < 1

    ema = validate_main(tiny_argv(tmp_path / 'ema', '--resume', str(out / 'last.pth.tar'), '--eval-ema'))
    assert ema['weights'] == 'ema' and os.path.exists(tmp_path / 'ema' / 'eval_results.json')


RESUME_FLAGS = ['--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1', '--mixup', '0.2',
                '--sched-on-updates', '--warmup-epochs', '1']


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    full = main(tiny_argv(tmp_path / 'full', *RESUME_FLAGS))
    assert not full['interrupted']

    # SIGTERM while loading batch 7 of epoch 1 (per epoch: 44 x 32 train images, 2 x 360 val images for model + EMA)
    kill_at = 44 * 32 + 2 * 360 + 7 * 32 + 3
    calls = {'n': 0}
    original = DigitsDataset.__getitem__

    def getitem(self, index):
        calls['n'] += 1
        if calls['n'] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, index)

    monkeypatch.setattr(DigitsDataset, '__getitem__', getitem)
    handler = signal.getsignal(signal.SIGTERM)
    stopped = main(tiny_argv(tmp_path / 'cut', *RESUME_FLAGS))
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    monkeypatch.setattr(DigitsDataset, '__getitem__', original)
    assert stopped['interrupted'] and stopped['epoch'] == 1 and stopped['batch'] == 8
    recovery = stopped['checkpoint']
    assert os.path.basename(recovery) == 'recovery-1-8.pth.tar'
    epoch0 = str(tmp_path / 'epoch0.pth.tar')
    shutil.copy(tmp_path / 'cut' / 'last.pth.tar', epoch0)  # the epoch-boundary checkpoint of the cut run

    resumed = main(tiny_argv(tmp_path / 'cut', *RESUME_FLAGS, '--resume', recovery))
    from_epoch0 = main(tiny_argv(tmp_path / 'epoch0', *RESUME_FLAGS, '--resume', epoch0))
    assert resumed['top1'] == full['top1'] == from_epoch0['top1']

    reference = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    for run in ('cut', 'epoch0'):
        ckpt = torch.load(tmp_path / run / 'last.pth.tar', weights_only=True)
        for key in ('state_dict', 'state_dict_ema'):
            torch.testing.assert_close(ckpt[key], reference[key], rtol=0, atol=0)
        torch.testing.assert_close(ckpt['optimizer']['state'], reference['optimizer']['state'], rtol=0, atol=0)
    rows = read_summary(tmp_path / 'cut' / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1]


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    # SGD: Adam would turn the float noise of exactly-zero gradients (the key bias) into full-size steps of either sign
    flags = ['--no-aug', '--smoothing', '0', '--no-tensorboard', '--opt', 'sgd', '--lr', '0.05']
    main(tiny_argv(tmp_path / 'one', *flags, epochs=1))
    argv = tiny_argv(tmp_path / 'two', *flags, epochs=1)
    argv[argv.index('-b') + 1] = '16'  # per process: 2 x 16 = the 1-process batch of 32
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(REPO, 'train_vit.py'), *argv],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'distributed mode with 2 processes (gloo)' in proc.stderr
    assert 'Distributed process group closed.' in proc.stderr  # not left to a destructor at exit (SIGABRT in gloo)
    one = torch.load(tmp_path / 'one' / 'last.pth.tar', weights_only=True)['state_dict']
    two = torch.load(tmp_path / 'two' / 'last.pth.tar', weights_only=True)['state_dict']
    assert one.keys() == two.keys()
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)
    assert len(read_summary(tmp_path / 'two' / 'summary.csv')) == 1  # written once, by rank 0


def test_a_process_group_made_by_the_caller_stays_open(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        main(tiny_argv(tmp_path / 'run', '--no-tensorboard', epochs=1))
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def _image_folder(root, classes=3, per_class=8, broken=False):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            folder = os.path.join(root, split, f'class{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f'{i}.png'))
    if broken:
        with open(os.path.join(root, 'train', 'class0', 'broken.png'), 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n truncated')
    return str(root)


def folder_argv(output, root, *extra):
    argv = tiny_argv(output, *extra, epochs=1)
    argv[argv.index('--dataset') + 1] = ''
    return argv + ['--data-dir', root, '-b', '8']


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_finetuning_restores_the_checkpoint_masa_options_with_a_new_head(trained_run, tmp_path, fmt):
    out, _ = trained_run
    source = str(out / 'last.pth.tar')
    ckpt = torch.load(source, weights_only=True)
    if fmt == 'safetensors':
        from safetensors.torch import save_file
        source = str(tmp_path / 'weights.safetensors')
        save_file(ckpt['state_dict'], source, metadata={'masa_kwargs': json.dumps(ckpt['masa_kwargs']),
                                                         'arch': MODEL})
    root = _image_folder(tmp_path / 'data')
    # the config asks for 2 atoms; the checkpoint was trained with 1: the checkpoint's options are restored
    kwargs = ['depth=2', 'embed_dim=64', 'num_heads=2', 'patch_size=8', 'num_atoms=2']
    argv = folder_argv(tmp_path / 'ft', root, '--initial-checkpoint', source, '--lr', '0', '--min-lr', '0',
                       '--weight-decay', '0')
    argv[argv.index('--model-kwargs') + 1:argv.index('--model-kwargs') + 1 + len(TINY)] = kwargs
    main(argv)
    tuned = torch.load(tmp_path / 'ft' / 'last.pth.tar', weights_only=True)
    assert tuned['masa_kwargs'] == ckpt['masa_kwargs']
    assert tuned['state_dict']['head.weight'].shape == (3, 64)
    # like timm, fine-tuning starts from a training checkpoint's EMA weights when it has them
    start = ckpt['state_dict_ema'] if fmt == 'pth' else ckpt['state_dict']
    body = {k: v for k, v in start.items() if not k.startswith('head.')}
    torch.testing.assert_close({k: tuned['state_dict'][k] for k in body}, body, rtol=0, atol=0)  # lr 0


def _exit_message(excinfo):
    return str(excinfo.value)


def test_config_keys_values_and_overrides(tmp_path):
    good = tmp_path / 'good.yaml'
    good.write_text('batch_size: 64\nlr: 5e-4\nmodel_kwargs:\n  depth: 2\n  num_atoms: 1\n')
    args, config = _parse_args(['--config', str(good), '-b', '16', '--model-kwargs', 'num_atoms=2'])
    assert args.batch_size == 16 and args.lr == 5e-4 and isinstance(args.lr, float)
    assert args.model_kwargs == {'depth': 2, 'num_atoms': 2}
    bad = tmp_path / 'bad.yaml'
    for text, message in [
        ('batch_sise: 32\n', r"unknown config key 'batch_sise' \(did you mean 'batch_size'\?\)"),
        ('lr: fast\n', 'lr must be a number'),
        ('epochs: 2.5\n', 'epochs must be an integer'),
        ('model_kwargs: 3\n', 'model_kwargs must be a mapping'),
        ('amp: 1\n', 'amp must be true or false'),
        ('bad_images: maybe\n', 'bad_images must be one of'),
    ]:
        bad.write_text(text)
        with pytest.raises(SystemExit, match=message):
            main(['--config', str(bad)])
    with pytest.raises(SystemExit, match='config file .* not found'):
        main(['--config', str(tmp_path / 'missing.yaml')])


def test_bad_input_gives_clear_errors_and_loses_nothing(trained_run, tmp_path):
    out, _ = trained_run
    last = str(out / 'last.pth.tar')
    before = sha(last)
    with pytest.raises(SystemExit, match='data folder .*missing does not exist'):
        main(folder_argv(tmp_path / 'a', str(tmp_path / 'missing')))
    with pytest.raises(SystemExit, match='--num-classes 5 does not match the 10 classes'):
        main(tiny_argv(tmp_path / 'b', '--num-classes', '5'))
    root = _image_folder(tmp_path / 'data3')
    with pytest.raises(SystemExit, match='has a 10-class head but the dataset has 3 classes.*--initial-checkpoint'):
        main(folder_argv(tmp_path / 'c', root, '--resume', last))
    with pytest.raises(SystemExit, match='already holds a run'):
        main(tiny_argv(out))
    with pytest.raises(SystemExit, match='either --resume .* or --initial-checkpoint'):
        main(tiny_argv(tmp_path / 'd', '--resume', last, '--initial-checkpoint', last))
    with pytest.raises(SystemExit, match='checkpoint .*nothing.pth.tar not found'):
        main(tiny_argv(tmp_path / 'e', '--resume', str(tmp_path / 'nothing.pth.tar')))

    with pytest.raises(SystemExit, match='--eval-metric ema_top1 is none of'):  # no --model-ema
        main(tiny_argv(tmp_path / 'g', '--eval-metric', 'ema_top1'))

    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(open(last, 'rb').read()[:5000])
    with pytest.raises(SystemExit, match='not a readable checkpoint'):
        main(tiny_argv(tmp_path / 'f', '--resume', str(truncated)))

    # a non-finite loss stops with the step number; nothing is written over the last good checkpoint
    with pytest.raises(SystemExit, match=r'non-finite loss \(nan\) at epoch 2, batch \d+, optimizer step \d+'):
        main(tiny_argv(out, '--resume', last, '--no-resume-opt', '--lr', '1e30', '--epochs', '3'))
    assert sha(last) == before
    assert len(read_summary(out / 'summary.csv')) == 2


class _RunsCode:
    """Unpickling this would create a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_checkpoints_needing_code_are_refused_and_never_run(trained_run, tmp_path):
    marker = str(tmp_path / 'code_was_run')
    evil = str(tmp_path / 'evil.pth.tar')
    torch.save({'state_dict': {}, 'payload': _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match='refused to load .*arbitrary pickled code'):
        load_checkpoint_file(evil)
    with pytest.raises(SystemExit, match='refused to load'):
        main(tiny_argv(tmp_path / 'run', '--initial-checkpoint', evil))
    assert not os.path.exists(marker)


def test_atomic_save_leaves_the_previous_file_when_killed(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pth.tar')
    save_atomic({'step': torch.tensor(1)}, path)
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # half-written ...
        raise KeyboardInterrupt  # ... when the process is stopped

    monkeypatch.setattr(torch, 'save', killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({'step': torch.tensor(2)}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert load_checkpoint_file(path)['step'] == 1
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint_file(path + '.tmp')


def test_unreadable_images_fail_by_default_or_are_skipped_and_counted(tmp_path):
    root = _image_folder(tmp_path / 'data', classes=2, broken=True)
    with pytest.raises(SystemExit, match='cannot read image .*broken.png.*--bad-images skip'):
        main(folder_argv(tmp_path / 'a', root))
    main(folder_argv(tmp_path / 'b', root, '--bad-images', 'skip'))
    rows = read_summary(tmp_path / 'b' / 'summary.csv')
    assert int(rows[0]['train_skipped_images']) == 1


def test_sigterm_to_all_processes_with_loader_workers_saves_a_recovery_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / 'run'
    argv = tiny_argv(out, "--workers", "2", "--no-tensorboard", epochs=1)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'train_vit.py'), *argv], cwd=str(tmp_path), stderr=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO),
        start_new_session=True)
    log = []
    for line in proc.stderr:  # wait until training runs, then signal the whole process group
        log.append(line)
        if 'Train: 0 [' in line:
            os.killpg(proc.pid, signal.SIGTERM)  # as SLURM's scancel: every process of the job
            break
    rest, _ = proc.communicate(timeout=120)[::-1]
    log = ''.join(log) + rest
    assert proc.returncode == 0, log[-3000:]
    assert 'Stopped by SIGTERM at epoch 0' in log
    recovery = [p for p in os.listdir(out) if p.startswith('recovery-0-')]
    assert len(recovery) == 1
    result = main(argv + ['--resume', str(out / recovery[0])])
    assert not result['interrupted'] and len(read_summary(out / 'summary.csv')) == 1
