"""Hydra plugins that make lightning-quant's config groups (``lightning_quant/...``) visible to any Hydra app.

Installing lightning-quant is enough: a user's primary config can then say
``- lightning_quant/callbacks@callbacks.ptq: post_training_quantization`` in its defaults list.

The schemas live in Hydra's ConfigStore, registered by ``import lightning_quant.configs``, which reads
every callback's signature and so imports Lightning. Hydra loads the plugins of every installed package
in every Hydra app, so this module stays light: the search-path plugin adds a config source that imports
``lightning_quant.configs`` only when a config under ``lightning_quant/`` is asked for. An app that uses
none of them does not import lightning-quant (nor Lightning, which takes seconds).

Hydra finds plugins by scanning the ``hydra_plugins`` namespace package: a normal install and a
current editable install (``pip install -e .``) are both found. Some editable installs hide it from that
scan (hydra issue #2359, older setuptools; or an editable install made before this folder existed:
redo ``pip install -e .``); there, ``import lightning_quant.configs`` in the app registers the same groups.
"""

from __future__ import annotations

import builtins
import importlib
import sys
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "lightning_quant"
SCHEMAS_MODULE = "lightning_quant.configs"


class LightningQuantSearchPathPlugin(SearchPathPlugin):
    """Puts lightning-quant's config groups on every Hydra app's search path (imported on first use)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="lightning-quant", path=f"{ImportOnFirstUse.scheme()}://{SCHEMAS_MODULE}")


class ImportOnFirstUse(ConfigSource):
    """Serves ``lightning_quant/...`` from Hydra's ConfigStore, importing the module that fills it on first use.

    Hydra composes from a deep copy of its config sources, and so of the ConfigStore as it was then.
    If lightning-quant's schemas were registered before (the app imported ``lightning_quant.configs``),
    Hydra's own ConfigStore source has them: this source steps aside, so they load as plain schemas.
    Otherwise this source registers them and serves them itself, from the live ConfigStore.
    """

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self._serving: Optional[bool] = None  # decided on the first question about lightning_quant/...

    @staticmethod
    def scheme() -> str:
        return "lightning-quant"

    def _store(self, config_path: str) -> Optional[ConfigStore]:
        """The ConfigStore if this source answers for ``config_path``, else None."""
        if config_path.strip("/").split("/")[0] != GROUP:
            return None
        if self._serving is None:
            self._serving = self.path not in sys.modules
            importlib.import_module(self.path)
        return ConfigStore.instance() if self._serving else None

    def available(self) -> bool:
        return True

    def load_config(self, config_path: str) -> ConfigResult:
        store = self._store(config_path)
        if store is None:
            raise ConfigLoadError(f"{config_path} is not served by {self.full_path()}")
        node = store.load(self._normalize_file_name(config_path))
        return ConfigResult(
            config=node.node, path=self.full_path(), provider=self.provider, header={"package": node.package}
        )

    def is_group(self, config_path: str) -> bool:
        store = self._store(config_path)
        return store is not None and store.get_type(config_path.rstrip("/")) == ObjectType.GROUP

    def is_config(self, config_path: str) -> bool:
        store = self._store(config_path)
        return (
            store is not None
            and store.get_type(self._normalize_file_name(config_path.rstrip("/"))) == ObjectType.CONFIG
        )

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> builtins.list[str]:
        store = self._store(config_path)
        if store is None:
            return []
        found: list[str] = []
        for name in store.list(config_path):
            self._list_add_result(found, f"{config_path}/{name}", name, results_filter)
        return sorted(set(found))
