"""``"aoti"``: an AOTInductor package, compiled with freezing so int8 ops become fused oneDNN kernels.

Without ``freezing`` the package keeps the q/dq graph and runs its matmuls in float (3.1 ms vs 0.65 ms
measured on a small CNN): the weights must be constants for Inductor to prepack them as int8. Freezing
applies only to a graph captured without autograd, hence ``torch.no_grad()`` around export and compile.

The C++ is compiled for the target's ISA (``-march``, vector width), not ``-march=native``: a package built on
an AVX-512 machine for ``target="avx2"`` runs on any AVX2 CPU. oneDNN picks its kernels (and the layout of the
prepacked weights) when the package runs, so a package is portable across CPUs that have its ``-march``.

For any batch size, Inductor prepacks the int8 weights for no input shape (``x_shape=None`` for a symbolic batch,
in torch/_inductor/fx_passes/quantization.py) and oneDNN re-lays them out on every call. They are prepacked for
the example input's shape instead (:class:`_PrepackForExampleShape`); oneDNN checks the layout at run time, so
other batch sizes stay right. Measured on transformers' ResNet-50, static int8, 224x224, 2 threads, AVX-512 VNNI
EPYC, load 1.6, one process: batch 1: 60.3 ms without the shape, 7.40 ms with it, 7.22 ms pinned to batch 1, float
eager 36.6 ms; batch 16: 151 ms without, 92.9 ms with (float eager 909 ms).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant.capture import capture
from lightning_quant.export.torch_export import tensors_only
from lightning_quant.files import atomic_path
from lightning_quant.inputs import ModelInputs
from lightning_quant.memory_format import with_contiguous_weights
from lightning_quant.target import TARGETS, CpuTarget
from lightning_quant.weight_packing import decompose

SUFFIX = ".pt2"
INDUCTOR_CONFIGS = {"freezing": True}


def export_aoti(
    model: nn.Module, inputs: ModelInputs, path: Path, dynamic_batch: bool = True, target: CpuTarget = TARGETS["avx2"]
) -> dict[str, Any]:
    model = with_contiguous_weights(model)  # channels-last weights (ChannelsLast) compile wrongly here
    configs = {**INDUCTOR_CONFIGS, **target.inductor_configs}
    with torch.no_grad(), atomic_path(path) as temporary, warnings.catch_warnings():
        # torch's own compile-time notes, about its code, not the user's model
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        captured = capture(model, inputs, dynamic_batch)
        with _prepack_for_example_shape():
            torch._inductor.aoti_compile_and_package(
                decompose(captured.program), package_path=str(temporary), inductor_configs=configs
            )
    return {
        "how": "torch.export -> torch._inductor.aoti_compile_and_package",
        "inductor_configs": configs,
        "load": "torch._inductor.aoti_load_package(path)(*args, **kwargs)",
        **captured.details(),
    }


class _PrepackForExampleShape:
    """An Inductor freezing pass: give each int8 weight prepack that got no input shape (a symbolic batch) the
    shape of the example input, so oneDNN lays the weights out once, at compile time, for that shape."""

    PREPACKS = (torch.ops.onednn.qconv_prepack.default, torch.ops.onednn.qlinear_prepack.default)

    @classmethod
    def prepacks(cls, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        """The graph's int8 weight prepacks; their last argument is the input shape they pack for."""
        # Inductor inserts the op packet; its .default is the overload
        return [
            n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "default", n.target) in cls.PREPACKS
        ]

    def apply(self, graph: torch.fx.Graph) -> None:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        for node in self.prepacks(graph):
            if node.args[-1] is None:
                activation = next(iter(node.users)).args[0]  # the int8 conv / linear's input
                assert isinstance(activation, torch.fx.Node)
                node.args = (*node.args[:-1], [optimization_hint(size) for size in activation.meta["val"].shape])


@contextlib.contextmanager
def _prepack_for_example_shape() -> Iterator[None]:
    from torch._inductor.fx_passes import freezing_patterns

    passes: list[Any] = freezing_patterns.pass_patterns  # Inductor calls each one's apply(graph) in order
    hint = _PrepackForExampleShape()
    passes.append(hint)  # after the pass that inserts the prepacks
    try:
        yield
    finally:
        passes.remove(hint)


def load_aoti(path: Path) -> Any:
    # torch warns "Device information mismatch for AOTI_CPU_ISA: AVX512 AVX512_VNNI vs AVX2" when a package
    # built for a narrower target loads on a wider CPU: that is the portable case working as meant
    package_logger = logging.getLogger("torch.export.pt2_archive._package")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)
    try:
        with tensors_only(path):  # the package is read by torch.export's archive reader, which unpickles
            return torch._inductor.aoti_load_package(str(path))
    finally:
        package_logger.setLevel(level)
