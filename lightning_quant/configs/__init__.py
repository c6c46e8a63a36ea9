"""Structured configs: the Hydra schema of the app, registered in Hydra's ConfigStore.

A YAML file in ``conf/`` extends one of these schemas through its defaults list, so a misspelt key
or a value of the wrong type fails at composition, with Hydra's message naming the key.
"""

from lightning_quant.configs.app import register_configs

register_configs()

__all__ = ["register_configs"]
