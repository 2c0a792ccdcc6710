"""Costing of each block kind: one module per kind, named after it, registered against its spec
class with `@block_costing`.

Adding a kind takes a spec class in simcc/specs/blocks.py (`@block_spec("name")`) and a module
here defining `params(spec, hidden)` and `work(spec, hidden, batch, shard)`. Every public module
in this package is imported here, so nothing else has to list it.
"""

from __future__ import annotations

import importlib
import pkgutil

from simcc.model.kinds._registry import COSTINGS, Costing, block_costing, costing_of

__all__ = ["COSTINGS", "Costing", "block_costing", "costing_of"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
