"""Weights on the grid of :func:`~lightning_quant.weight_packing.quantize_weight` chosen with calibration data: the
integers and per-group scales :class:`~lightning_quant.quantization.weight_only.PackedWeight` stores, so the files
are the same ``MatMulNBits`` nodes as round-to-nearest's, only with other values in them.

Each Linear's calibration inputs ``x`` give ``H = mean(x xᵀ)``: the output error of a weight error ``d`` (one row)
is ``dᵀ H d``. Two methods read it:

* ``"clip"`` (AWQ's clipping search): per group, the scale is the largest-magnitude weight's shrunk by one of
  ``1, 0.975, ..., 0.5`` (elements beyond the range clamp), the one whose rounding error ``d_gᵀ H_gg d_g`` on the
  group's own input block is least; then round to nearest.
* ``"gptq"`` (GPTQ, Frantar et al. 2022): input columns rounded one at a time, the error of each spread over the
  columns not yet rounded through ``H⁻¹`` (the least-squares update), groups' scales chosen as by ``"clip"``
  when the group's first column is reached (on the weights as updated so far).

An embedding table's rows are looked up, not mixed, so its output error is its rows' own error: both methods choose
each group's scale by the least squared error of the group's weights (the same search, ``H`` the identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_quant.inputs import ModelInputs

METHODS = ("rtn", "clip", "gptq")
#: methods that read calibration inputs
DATA_METHODS = ("clip", "gptq")
#: the clipping ratios searched per group (AWQ: 20 steps down to half the range)
CLIP_RATIOS = tuple(1.0 - 0.025 * step for step in range(21))
#: GPTQ's damping: this fraction of the mean diagonal of H is added to it (H may be singular)
DAMPING = 0.01


def input_second_moments(
    model: nn.Module, names: Sequence[str], calibration: Sequence[ModelInputs]
) -> dict[str, torch.Tensor]:
    """``{name: mean(x xᵀ)}`` over every input row ``x`` the layers ``names`` (Linear, Conv1D) see when ``model``
    runs the ``calibration`` calls (float64, ``(in_features, in_features)``)."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def record(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        product = (x.t() @ x).double()
        sums[name] = product if name not in sums else sums[name] + product
        rows[name] = rows.get(name, 0) + x.shape[0]

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: record(name, module, args, kwargs), with_kwargs=True
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            for inputs in calibration:
                inputs(model)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / rows[name] for name, total in sums.items()}


def _round(groups: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lowest = -(2 ** (bits - 1))
    return torch.clamp(torch.round(groups / scale), lowest, -lowest - 1)


def search_scales(groups: torch.Tensor, bits: int, block: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The scale of each group of ``groups`` (``(rows, groups, group_size)``), ``(rows, groups)``: the
    round-to-nearest scale (largest-magnitude weight on the lowest level) shrunk by the ratio of
    :data:`CLIP_RATIOS` whose rounding error ``dᵀ B d`` is least, ``B`` the group's ``block`` of ``H``
    (``(groups, group_size, group_size)``; ``None``: the identity, the squared error)."""
    groups = groups.double()
    extreme = groups.gather(2, groups.abs().argmax(2, keepdim=True))
    base = extreme / -(2 ** (bits - 1))
    base = torch.where(base == 0, torch.ones_like(base), base)
    best_scale, best_error = base, None
    for ratio in CLIP_RATIOS:
        scale = base * ratio
        error = _round(groups, scale, bits) * scale - groups
        if block is None:
            cost = (error * error).sum(2)
        else:
            cost = torch.einsum("rgi,gij,rgj->rg", error, block, error)
        if best_error is None:
            best_error = cost
            continue
        better = (cost < best_error).unsqueeze(2)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(cost, best_error)
    return best_scale.squeeze(2)


def _diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    count = hessian.shape[0] // group_size
    blocks = hessian.reshape(count, group_size, count, group_size)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def clip_quantize(
    weight: torch.Tensor, bits: int, group_size: int, hessian: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` as :func:`~lightning_quant.weight_packing.quantize_weight` returns them, each group's scale
    searched by :func:`search_scales` on the groups' diagonal blocks of ``hessian`` (``None``: squared error)."""
    rows, columns = weight.shape
    groups = weight.detach().double().reshape(rows, columns // group_size, group_size)
    block = None if hessian is None else _diagonal_blocks(hessian.double(), group_size)
    scale = search_scales(groups, bits, block)
    q = _round(groups, scale.unsqueeze(2), bits)
    return q.reshape(rows, columns).to(torch.int8), scale.to(torch.float32)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` by GPTQ: columns in order, each one's rounding error compensated on the later columns through
    the inverse of ``hessian`` (damped by :data:`DAMPING`), each group's scale searched (:func:`search_scales`)
    when its first column is reached."""
    rows, columns = weight.shape
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    unused = h.diagonal() == 0  # inputs that were always zero: rounded without compensation
    h[unused, unused] = 1.0
    h += DAMPING * h.diagonal().mean() * torch.eye(columns, dtype=h.dtype)
    # the upper Cholesky factor of H⁻¹: row i holds the updates of the columns after i (GPTQ's formulation)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    blocks = _diagonal_blocks(h, group_size)
    q = torch.zeros(rows, columns, dtype=torch.float64)
    scales = torch.zeros(rows, columns // group_size, dtype=torch.float64)
    for column in range(columns):
        group = column // group_size
        if column % group_size == 0:
            span = w[:, column : column + group_size].unsqueeze(1)
            scales[:, group] = search_scales(span, bits, blocks[group : group + 1])[:, 0]
        scale = scales[:, group]
        q[:, column] = _round(w[:, column], scale, bits)
        error = (w[:, column] - q[:, column] * scale) / inverse[column, column]
        w[:, column + 1 :] -= error.unsqueeze(1) * inverse[column, column + 1 :].unsqueeze(0)
    return q.to(torch.int8), scales.to(torch.float32)
