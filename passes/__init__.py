"""Built-in passes, one module each; importing this package registers them by name.

Every module in this folder is imported, so a new pass only needs its own file: no list to keep in step.

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.analysis, graphopt.pipeline, graphopt.quant,
graphopt.calibration, graphopt.kernels.
"""

import importlib
import pkgutil

BUILTIN_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in BUILTIN_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
