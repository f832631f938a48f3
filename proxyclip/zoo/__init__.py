"""The 2025 methods that read more than the last block, one module each (registered on import).

Each module writes its method from the spec in docs/methods.md: one function (or a few), its
``register_method(Method(..., parts=...))`` with the knobs declared, a conf/method YAML and its tests.
``proxyclip.methods`` imports this package last, so every module here is registered with the six
last-block methods.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
