"""Built-in merge methods: importing this package registers each one.

Every module in this package (except private ``_*`` helpers) is imported, so adding a
method is adding one file here.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
