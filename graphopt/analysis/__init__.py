"""Stage 2, analysis: what may change together and what matters: coupled channel groups (dependency/), residual and
transformer blocks (blocks.py), importance scores (importance.py), sparsity patterns and masks (sparsity.py).

May import: graphopt.errors, graphopt.util, graphopt.graph.
"""
