""" Every YAML in configs/ parses against the training flags, builds its model and resolves its data config """
import glob
import os

import pytest
import timm
import torch
import yaml
from timm.data import resolve_data_config

import masa_vit
from masa_vit.data import create_dataset, dataset_classes
from masa_vit.train import _parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml')))
NAMES = [os.path.basename(p) for p in CONFIGS]


def test_there_are_configs_for_every_recipe():
    assert 'demo_digits.yaml' in NAMES
    for size in ('tiny', 'small', 'base'):
        for kind in ('masa', 'dense'):
            assert f'imagenet_deit_{size}_{kind}.yaml' in NAMES
            assert f'imagenet_finetune_{size}_{kind}.yaml' in NAMES
    for dataset in ('cifar10', 'cifar100', 'tinyimagenet'):
        for shape in ('nano', 'micro', 'microd'):
            for kind in ('masa', 'dense'):
                assert f'{dataset}_{shape}_{kind}.yaml' in NAMES


@pytest.mark.parametrize('path', CONFIGS, ids=NAMES)
def test_config_builds_its_model_and_data_config(path):
    args, config = _parse_args(['--config', path])
    assert args.model in timm.list_models('masa_vit_*') or args.model in timm.list_models(), args.model
    kwargs = dict(args.model_kwargs)
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    with torch.device('meta'):  # structure and parameter shapes without allocating ViT-B's weights
        model = timm.create_model(args.model, num_classes=args.num_classes or 10, **kwargs)
    counts = masa_vit.count_params(model)
    sharing = getattr(model, 'masa_kwargs', {}).get('sharing', 'dense')
    if sharing == 'masa':
        assert counts['attention_compression'] > 0.5  # S = 4 (or 2) atoms for 6-24 blocks
    else:
        assert counts['attention_compression'] == 0.

    data_config = resolve_data_config(vars(args), model=model)
    assert tuple(data_config['input_size'][1:]) == tuple(model.patch_embed.img_size)
    assert len(data_config['mean']) == len(data_config['std']) == 3
    assert args.dataset in ('digits', '', 'folder') or args.dataset.startswith('torch/'), args.dataset
    assert args.output and os.path.basename(args.output.rstrip('/')) == os.path.basename(path)[:-5] \
        or os.path.basename(path) == 'demo_digits.yaml'
    assert not args.dataset_download  # downloading is the user's explicit choice


@pytest.mark.parametrize('path', [p for p in CONFIGS if p.endswith('_masa.yaml')],
                         ids=[n for n in NAMES if n.endswith('_masa.yaml')])
def test_masa_and_dense_twins_share_the_recipe(path):
    masa = yaml.safe_load(open(path))
    dense = yaml.safe_load(open(path.replace('_masa.yaml', '_dense.yaml')))
    differ = {k for k in set(masa) | set(dense) if masa.get(k) != dense.get(k)}
    assert differ <= {'model_kwargs', 'output'}, differ
    assert masa['model_kwargs'].pop('sharing') == 'masa' and dense['model_kwargs'].pop('sharing') == 'dense'
    assert masa['model_kwargs'].pop('share') == 'qkvo' and masa['model_kwargs'].pop('num_atoms') == 4
    assert masa['model_kwargs'] == dense['model_kwargs']


def test_demo_config_data_is_bundled():
    args, _ = _parse_args(['--config', os.path.join(REPO, 'configs', 'demo_digits.yaml')])
    train = create_dataset(args.dataset, split=args.train_split)
    val = create_dataset(args.dataset, split=args.val_split)
    assert (len(train), len(val), dataset_classes(train)) == (1437, 360, 10)
    assert args.model_kwargs['sharing'] == 'masa' and args.workers == 0
