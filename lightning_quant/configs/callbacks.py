"""Schemas of the callbacks, read from their signatures, in Hydra's ConfigStore as
``lightning_quant/callbacks/<snake_case_name>`` (e.g. ``lightning_quant/callbacks/post_training_quantization``).

A config file attaches one through its defaults list, so its keys are checked against the class's
``__init__``; a file in ``conf/callbacks/`` holds one callback under its own key::

    # conf/callbacks/ptq.yaml
    defaults:
      - /lightning_quant/callbacks@ptq: post_training_quantization
      - _self_

    ptq:
      _target_: lightning_quant.PostTrainingQuantization
      num_calibration_batches: 32

To give another callback a schema, add its dotted path to ``CALLBACKS``.
"""

from __future__ import annotations

import importlib.util
import warnings

from hydra.core.config_store import ConfigStore

from lightning_quant.configs.signature import config_from_signature, snake_case

GROUP = "lightning_quant/callbacks"

# Dotted paths of the classes that get a schema. A class whose module does not exist is skipped; one
# whose module fails to import is skipped with a warning that says why (the app still starts, and an
# option that uses the schema fails naming it).
CALLBACKS = (
    "lightning_quant.callbacks.post_training_quantization.PostTrainingQuantization",
    "lightning_quant.callbacks.dynamic_quantization.DynamicQuantization",
    "lightning_quant.callbacks.quantization_aware_training.QuantizationAwareTraining",
    "lightning_quant.callbacks.auto_mixed_precision.AutoMixedPrecision",
    "lightning_quant.callbacks.channels_last.ChannelsLast",
    "lightning_quant.callbacks.optimize_for_inference.OptimizeForInference",
    "lightning_quant.callbacks.weight_only_quantization.WeightOnlyQuantization",
    "lightning_quant.callbacks.weight_only_qat.WeightOnlyQAT",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
)


def register_callback_configs(store: ConfigStore | None = None) -> list[str]:
    """Store a schema for every callback in ``CALLBACKS`` whose module exists; return the names stored."""
    store = store or ConfigStore.instance()
    stored = []
    for path in CALLBACKS:
        module, class_name = path.rsplit(".", 1)
        if importlib.util.find_spec(module) is None:
            continue
        try:
            schema = config_from_signature(path, module=__name__)
        except Exception as err:  # noqa: BLE001  (a broken callback module must not take the whole app down)
            warnings.warn(f"No schema for {path}: {type(err).__name__}: {err}", stacklevel=2)
            continue
        store.store(group=GROUP, name=snake_case(class_name), node=schema, provider="lightning-quant")
        stored.append(snake_case(class_name))
    return stored
