"""Packed low-bit weights, shared by quantization/ and export/: the grid (:func:`quantize_weight`), the packing
ONNX Runtime's ``MatMulNBits`` reads (:func:`pack`), and the ``lightning_quant::weight_only_linear`` op that runs
it in PyTorch, written as ``MatMulNBits`` by the ONNX export (:func:`onnx_translations`) and as plain ATen ops in
``.pt2`` files (:func:`decompose`), which therefore load without this package.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import functional as F


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` int8 of ``weight``'s shape with values in ``[-2**(bits-1), 2**(bits-1) - 1]``,
    ``scale`` of shape ``(out_features, in_features // group_size)``; ``q * scale`` (per group) is the
    quantized weight.

    Example::

        >>> q, scale = quantize_weight(torch.tensor([[0.5, -1.0, 0.25, 0.0]]), bits=4, group_size=4)
        >>> q.tolist(), scale.tolist()
        ([[4, -8, 2, 0]], [[0.125]])
    """
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lowest = -(2 ** (bits - 1))
    # the signed element of largest magnitude maps to the lowest level exactly (ONNX Runtime's symmetric rule)
    extreme = groups.gather(2, groups.abs().argmax(2, keepdim=True))
    scale = extreme / lowest
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(groups / scale), lowest, -lowest - 1)
    return q.reshape(out_features, in_features).to(torch.int8), scale.squeeze(2)


def pack(q: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``q`` (int8, ``(N, K)``) as ``MatMulNBits``'s ``B``: uint8 ``(N, K // group_size, group_size * bits // 8)``;
    for 4 bits, element ``2i`` in the low nibble of byte ``i``."""
    unsigned = (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).reshape(q.shape[0], -1, group_size)
    if bits == 8:
        return unsigned.contiguous()
    return (unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed integers of :func:`pack`, ``(N, groups, group_size)``."""
    if bits == 4:
        packed = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return packed.to(torch.int16) - 2 ** (bits - 1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The float weight ``(N, K)`` the packed integers and scales stand for."""
    q = unpack(packed, bits)
    return (q.to(scales.dtype) * scales.unsqueeze(2)).flatten(1)


def is_packed_layer(module: Any) -> bool:
    """Whether ``module`` holds its weight packed by :func:`pack`: ``packed`` and ``scales`` tensors and ``bits`` and
    ``group_size`` (``WeightOnlyLinear``, with ``in_features``, ``out_features`` and ``bias``; ``WeightOnlyEmbedding``,
    with ``num_embeddings`` and ``embedding_dim``). Export formats read packed layers through this, not the classes."""
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in ("packed", "scales")) and all(
        isinstance(getattr(module, name, None), int) for name in ("bits", "group_size")
    )


def embedding_rows(indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``F.embedding`` of the packed table: the rows at ``indices``, dequantized (``(*indices.shape, K)``). Plain
    gather and integer arithmetic (no bit operations), so every exporter and runtime takes it as it is.

    Example::

        >>> q, scale = quantize_weight(torch.tensor([[0.5, -1.0, 0.25, 0.0], [1.0, 2.0, 3.0, -4.0]]), 4, 4)
        >>> embedding_rows(torch.tensor([1, 0]), pack(q, 4, 4), scale, 4).tolist()
        [[1.0, 2.0, 3.0, -4.0], [0.5, -1.0, 0.25, 0.0]]
    """
    # index_select on dimension 0 is one ONNX Gather reading the table as stored; indexing (packed[indices]) is
    # written with a transpose of the table, which the ONNX optimizer folds into a second copy of it
    flat = indices.reshape(-1)
    rows = packed.index_select(0, flat).reshape(*indices.shape, *packed.shape[1:]).to(torch.int32)
    if bits == 4:  # element 2i in the low nibble of byte i, as pack() writes it
        rows = torch.stack((rows % 16, rows // 16), dim=-1).flatten(-2)
    q = rows - 2 ** (bits - 1)
    row_scales = scales.index_select(0, flat).reshape(*indices.shape, scales.shape[1])
    return (q.to(scales.dtype) * row_scales.unsqueeze(-1)).flatten(-2)


def linear_reference(
    input: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``F.linear`` with the dequantized weight (the reference numerics; ONNX Runtime's kernel fuses the two)."""
    return F.linear(input, dequantize(packed, scales, bits), bias)


weight_only_linear = torch.library.custom_op("lightning_quant::weight_only_linear", mutates_args=())(linear_reference)


@weight_only_linear.register_fake
def _(
    input: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], packed.shape[0]))


def decompose(program: torch.export.ExportedProgram, core_aten: bool = True) -> torch.export.ExportedProgram:
    """``program`` with ``weight_only_linear`` written as ATen ops (unpack the nibbles with bitwise ops, subtract
    the zero point, scale, matmul; the packed uint8 weights stay the program's constants), and with
    ``core_aten`` every other op decomposed to core ATen too: for AOTInductor, which compiles ATen ops only, and
    (``core_aten=False``: the rest of the graph as exported) for saved programs, which then load with plain torch.
    Any other program as it is."""
    op = torch.ops.lightning_quant.weight_only_linear.default
    if not any(node.target is op for node in program.graph.nodes):
        return program
    table = torch.export.default_decompositions() if core_aten else {}
    table[op] = linear_reference
    return program.run_decompositions(table)


def onnx_translations() -> dict[Any, Any]:
    """``torch.onnx.export``'s ``custom_translation_table`` entry writing ``weight_only_linear`` as ONNX Runtime's
    ``com.microsoft::MatMulNBits`` (float compute: exact on every x86 CPU)."""
    import onnx
    import onnxscript

    # ONNX Runtime's contrib op has no schema in the onnx package; the exporter needs one to write the node
    parameter, attribute = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            parameter("A", "T1"),
            parameter("B", "T2"),
            parameter("scales", "T1"),
            parameter("zero_points", "T3", param_option=optional),
            parameter("g_idx", "T4", param_option=optional),
            parameter("bias", "T1", param_option=optional),
        ],
        outputs=[parameter("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float)"], ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[
            attribute(name, onnx.defs.OpSchema.AttrType.INT, "")
            for name in ("K", "N", "bits", "block_size", "accuracy_level")
        ],
    )
    matmul_nbits_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)

    def matmul_nbits(
        input: Any, packed: Any, scales: Any, bias: Any = None, bits: int = 4, group_size: int = 32
    ) -> Any:
        out_features, groups, _ = packed.shape
        args = [input, packed, scales]
        if bias is not None:
            args += [None, None, bias]
        return matmul_nbits_op(
            *args, K=groups * group_size, N=out_features, bits=bits, block_size=group_size, accuracy_level=0
        )

    return {torch.ops.lightning_quant.weight_only_linear.default: matmul_nbits}
