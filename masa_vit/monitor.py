""" TensorBoard helpers: parameter counts and MASA coefficient heatmaps

For a MASA model, each shared projection (q, k, v, o) of each group of blocks has a coefficient matrix C of shape
(blocks, atoms): block l uses W_l = sum_s C[l, s] * A_s. `log_coefficients` draws the matrices of a group side by side
as labeled heatmaps (blocks down, atoms across, a diverging colour map centred on 0 with a colour bar, values printed
in the cells when the matrices are small) through `SummaryWriter.add_figure`, and adds a histogram of each, so a run
shows how the blocks share the atoms as training goes. One figure per group keeps this cheap enough for every epoch.
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


def coefficient_figure(
        coefs: Dict[str, torch.Tensor],
        blocks: List[int],
        title: str,
        annotate: Optional[bool] = None,
):
    """Heatmaps of the coefficient matrices C (blocks x atoms) of one group's projections, side by side.

    All panels share one symmetric colour scale (a diverging map, white at 0, red positive, blue negative) and one
    colour bar, so the projections can be compared at a glance; the values are printed in the cells when small.

    Args:
        coefs: Projection name ('q', 'k', 'v', 'o', ...) -> C of shape (num_blocks, num_atoms).
        blocks: Model block index of each row.
        title: Figure title, e.g. 'MASA coefficients, epoch 3'.
        annotate: Print the value in each cell (default: when C has at most 24 x 8 entries).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    mats = {name: c.detach().float().cpu() for name, c in coefs.items()}
    num_blocks, num_atoms = next(iter(mats.values())).shape
    if annotate is None:
        annotate = num_blocks <= 24 and num_atoms <= 8
    vmax = max(max(float(c.abs().max()) for c in mats.values()), 1e-8)
    panel_w = 0.45 * num_atoms + 0.5
    fig = Figure(figsize=(0.9 + panel_w * len(mats) + 1.0, 1.3 + 0.3 * num_blocks), dpi=90)
    axes = fig.subplots(1, len(mats), sharey=True, squeeze=False)[0]
    for ax, (name, c) in zip(axes, mats.items()):
        im = ax.imshow(c.numpy(), cmap='RdBu_r', vmin=-vmax, vmax=vmax, aspect='auto', interpolation='nearest')
        ax.set_xticks(range(num_atoms), [str(s) for s in range(num_atoms)], fontsize=8)
        ax.set_xlabel('atom', fontsize=9)
        ax.set_title(f'C_{name}', fontsize=10)
        if annotate:
            for i in range(num_blocks):
                for j in range(num_atoms):
                    v = float(c[i, j])
                    ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=6.5,
                            color='white' if abs(v) > 0.6 * vmax else 'black')
    axes[0].set_yticks(range(num_blocks), [str(b) for b in blocks], fontsize=8)
    axes[0].set_ylabel('block', fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=1 - 1.0 / fig.get_figwidth(), bottom=0.55 /
                        fig.get_figheight(), top=1 - 0.55 / fig.get_figheight(), wspace=0.12)
    cax = fig.add_axes((1 - 0.85 / fig.get_figwidth(), 0.55 / fig.get_figheight(), 0.12 / fig.get_figwidth(),
                        1 - 1.1 / fig.get_figheight()))
    fig.colorbar(im, cax=cax).set_label('coefficient', fontsize=9)
    return fig


def log_coefficients(writer, model: nn.Module, step: int, epoch: Optional[int] = None) -> int:
    """Write one heatmap figure per group of blocks (all its projections) and a histogram per coefficient matrix.

    Tags: `masa_coefficients/all` (one group) or `masa_coefficients/group{g}`, and
    `masa_coefficients_hist/{name}` (or `{name}_group{g}`). Returns the number of matrices written.
    """
    entries = coefficient_matrices(model)
    groups = sorted({e['group'] for e in entries})
    for g in groups:
        members = [e for e in entries if e['group'] == g]
        suffix = f'_group{g}' if len(groups) > 1 else ''
        title = 'MASA coefficients' + (f', blocks {members[0]["blocks"][0]}-{members[0]["blocks"][-1]}'
                                       if len(groups) > 1 else '') + (f', epoch {epoch}' if epoch is not None else '')
        fig = coefficient_figure({e['name']: e['coef'] for e in members}, members[0]['blocks'], title)
        writer.add_figure(f'masa_coefficients/{"group" + str(g) if len(groups) > 1 else "all"}', fig,
                          global_step=step, close=True)
        for e in members:
            writer.add_histogram(f'masa_coefficients_hist/{e["name"]}{suffix}', e['coef'].flatten(), global_step=step)
    return len(entries)


def log_param_counts(writer, model: nn.Module, step: int = 0) -> Dict[str, Any]:
    """Write the parameter counts (total, attention, dense attention, compression) as scalars."""
    counts = param_counts(model)
    for key, value in counts.items():
        writer.add_scalar(f'model/{key}', value, step)
    return counts
