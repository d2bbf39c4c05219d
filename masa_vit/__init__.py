""" masa-vit: MASA (Matrix Atom Sharing in Attention) Vision Transformers for timm.

Importing the package registers the `masa_vit_*` models with timm:

    import timm, masa_vit
    model = timm.create_model('masa_vit_base')  # ViT-B/16, MASA-QKVO, S = 4
"""
from .dictionary import AtomDictionary
from .attention import AtomLinear
from .conversion import convert_state_dict, from_dense, load_converted, save_converted, svd_from_dense
from .masa_vision_transformer import (
    MasaVisionTransformer,
    SharedWeightBlocks,
    checkpoint_filter_fn,
    coefficient_matrices,
    count_params,
    to_dense,
)

__version__ = '0.1.0'

__all__ = [
    'AtomDictionary',
    'AtomLinear',
    'MasaVisionTransformer',
    'SharedWeightBlocks',
    'checkpoint_filter_fn',
    'coefficient_matrices',
    'convert_state_dict',
    'count_params',
    'from_dense',
    'load_converted',
    'save_converted',
    'svd_from_dense',
    'to_dense',
]
