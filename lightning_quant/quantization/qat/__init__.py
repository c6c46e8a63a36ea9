"""Quantization-aware training with PT2E (torchao), without Lightning.

:func:`prepare_qat` exports ``model.forward`` in training mode with ``torch.export`` (batch dimension
dynamic), inserts fake-quant modules with ``prepare_qat_pt2e`` and ``X86InductorQuantizer(is_qat=True)``,
and returns a :class:`QATGraph`: a callable that computes ``model.forward`` with fake-quant.

The graph owns only fake-quant state; it computes with ``model``'s own parameters and buffers (export
shares the tensor objects; when the model's differ, e.g. a pruned ``weight`` computed from its mask, they
are bound per call with ``torch.func.functional_call``). So everything that acts on the original module
keeps working while the graph trains: the optimizer built over ``model.parameters()``,
``torch.nn.utils.prune`` masks, ``load_state_dict``, DDP's gradient hooks and buffer broadcast.
``model.state_dict()`` never changes shape: a checkpoint taken during QAT loads into the float model.

The PT2E traps handled here, each with a test:

* ``model.eval()``/``train()`` do not switch an exported graph; the documented helpers
  ``move_exported_model_to_eval``/``_train`` do, but they rewrite BatchNorm with the default momentum and
  eps and dropout with ``p=0.5``. The values are put back after every switch.
* ``prepare_qat_pt2e``'s conv-BN fusion also writes momentum 0.1 and eps 1e-5, and ``convert_pt2e`` folds
  BN into the conv with eps 1e-5 whatever the module said (after tracing 96 patterns: tens of seconds).
  The module's values are put back after prepare, and :meth:`QATGraph.convert` folds conv-BN itself,
  with the real eps, before ``convert_pt2e``.
* A BatchNorm in eval mode still increments ``num_batches_tracked`` in the exported graph: outside
  training the graph computes with copies of the model's buffers, so evaluation changes nothing.
* A quantizer that annotates nothing would train a float model and call it QAT: zero fake-quant
  modules after prepare is an error.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> qat = prepare_qat(model, torch.randn(4, 3, 8, 8))
    >>> qat.attach()  # model(x) now runs the fake-quant graph on model's own parameters
    >>> model(torch.randn(16, 3, 8, 8)).shape
    torch.Size([16, 10])
    >>> qat.num_fake_quantizers
    4
    >>> int8 = qat.convert()  # a PT2E int8 (q/dq) graph, ready for export and lowering
    >>> int8(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
"""

from lightning_quant.quantization.qat.config import QATConfig, make_qat_quantizer
from lightning_quant.quantization.qat.graph import QATGraph, prepare_qat

__all__ = ["QATConfig", "QATGraph", "make_qat_quantizer", "prepare_qat"]
