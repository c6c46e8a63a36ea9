"""Structured configs: the Hydra schemas of the app and of every callback, in Hydra's ConfigStore.

A YAML file extends one of these schemas through its defaults list, so a misspelt key or a value of
the wrong type fails at composition, with Hydra's message naming the key. Importing this package
registers them all:

- the app's, under ``lightning_quant/app/`` (``train``, ``data/digits``, ``model/<name>``, ``trainer/default``);
- ``lightning_quant/callbacks/<snake_case_class_name>``: one per callback, read from its ``__init__``
  (see :mod:`lightning_quant.configs.callbacks`);
- ``lightning_quant/sweep/comparison``: the Hydra callback that compares the jobs of a multirun.

A separate Hydra app gets the ``lightning_quant/...`` groups without importing anything (the
``hydra_plugins/lightning_quant_plugin`` search-path plugin), or with ``import lightning_quant.configs``
(for an install whose plugin Hydra cannot scan: see ``hydra_plugins/lightning_quant_plugin``).
"""

from hydra.core.config_store import ConfigStore

from lightning_quant.configs.app import register_app_configs
from lightning_quant.configs.callbacks import register_callback_configs
from lightning_quant.configs.signature import config_from_signature, snake_case

SweepComparisonConfig = config_from_signature(
    "lightning_quant.sweep.SweepComparison", name="SweepComparisonConfig", module=__name__
)


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (safe to call more than once)."""
    register_app_configs()
    register_callback_configs()
    ConfigStore.instance().store(
        group="lightning_quant/sweep", name="comparison", node=SweepComparisonConfig, provider="lightning-quant"
    )


register_configs()

__all__ = ["config_from_signature", "register_configs", "snake_case"]
