""" TensorBoard helpers: parameter counts and MASA coefficient heatmaps

For a MASA model, each shared projection (q, k, v, o) of each group of blocks has a coefficient matrix C of shape
(blocks, atoms): block l uses W_l = sum_s C[l, s] * A_s. `log_coefficients` draws every C as a labeled heatmap
(blocks down, atoms across, a diverging colour map centred on 0 with a colour bar, values printed in the cells when the
matrix is small) through `SummaryWriter.add_figure`, and adds a histogram of its entries, so a run shows how the
blocks share the atoms as training goes.
"""
import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

__all__ = ['coefficient_figure', 'log_coefficients', 'log_param_counts', 'param_counts']

_logger = logging.getLogger(__name__)


def param_counts(model: nn.Module) -> Dict[str, Any]:
    """`masa_vit.count_params` (total, attention, attention_dense, attention_compression) of any ViT."""
    from . import count_params
    return count_params(model)


def coefficient_matrices(model: nn.Module) -> List[Dict[str, Any]]:
    """`masa_vit.coefficient_matrices`, empty for models without shared attention (timm's own ViTs)."""
    from . import coefficient_matrices as _coefficient_matrices
    return _coefficient_matrices(model)


def coefficient_figure(coef: torch.Tensor, blocks: List[int], title: str, annotate: Optional[bool] = None):
    """A heatmap of one coefficient matrix C (blocks x atoms) as a matplotlib figure.

    Args:
        coef: C, shape (num_blocks, num_atoms).
        blocks: Model block index of each row.
        title: Figure title, e.g. 'C_q (group 0), epoch 3'.
        annotate: Print the value in each cell (default: when C has at most 24 x 12 entries).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    coef = coef.detach().float().cpu()
    num_blocks, num_atoms = coef.shape
    if annotate is None:
        annotate = num_blocks <= 24 and num_atoms <= 12
    vmax = max(float(coef.abs().max()), 1e-8)  # symmetric limits: white is 0, red positive, blue negative
    fig = Figure(figsize=(1.6 + 0.55 * num_atoms, 1.2 + 0.32 * num_blocks), dpi=100, layout='constrained')
    ax = fig.add_subplot()
    im = ax.imshow(coef.numpy(), cmap='RdBu_r', vmin=-vmax, vmax=vmax, aspect='auto', interpolation='nearest')
    ax.set_xticks(range(num_atoms), [str(s) for s in range(num_atoms)])
    ax.set_yticks(range(num_blocks), [str(b) for b in blocks])
    ax.set_xlabel('atom')
    ax.set_ylabel('block')
    ax.set_title(title, fontsize=10)
    if annotate:
        for i in range(num_blocks):
            for j in range(num_atoms):
                v = float(coef[i, j])
                ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
                        color='white' if abs(v) > 0.6 * vmax else 'black')
    fig.colorbar(im, ax=ax, label='coefficient')
    return fig


def log_coefficients(writer, model: nn.Module, step: int, epoch: Optional[int] = None) -> int:
    """Write a heatmap and a histogram of every coefficient matrix of `model`; returns how many were written."""
    entries = coefficient_matrices(model)
    for entry in entries:
        name, group = entry['name'], entry['group']
        tag = f'{name}_group{group}' if any(e['group'] for e in entries) else name
        title = f'C_{name}' + (f' (group {group})' if tag != name else '') + (
            f', epoch {epoch}' if epoch is not None else '')
        writer.add_figure(f'masa_coefficients/{tag}', coefficient_figure(entry['coef'], entry['blocks'], title),
                          global_step=step, close=True)
        writer.add_histogram(f'masa_coefficients_hist/{tag}', entry['coef'].flatten(), global_step=step)
    return len(entries)


def log_param_counts(writer, model: nn.Module, step: int = 0) -> Dict[str, Any]:
    """Write the parameter counts (total, attention, dense attention, compression) as scalars."""
    counts = param_counts(model)
    for key, value in counts.items():
        writer.add_scalar(f'model/{key}', value, step)
    return counts
