"""Stage 3, the pass pipeline: the ``Pass`` contract and its context (pass_base.py), the ordered manager (manager.py),
the instruments it calls around every pass (instruments.py), pass names and pipeline strings (registry.py), the
report (report.py), and the counts the report and instruments use (metrics.py). The passes themselves live in
``graphopt.passes`` (the passes/ folder), above this package.

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.kernels.
"""

from graphopt.pipeline.manager import PassManager, check_order
from graphopt.pipeline.pass_base import Context, Pass, PassResult

__all__ = ["Context", "Pass", "PassManager", "PassResult", "check_order"]
