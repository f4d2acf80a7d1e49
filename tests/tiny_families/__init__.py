"""One module per model family added to the tiny-model matrix; each registers its builder with
``@tiny_family`` (see ``tiny_parts``). Modules are discovered, not listed."""
from __future__ import annotations

import importlib
import pkgutil

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")
