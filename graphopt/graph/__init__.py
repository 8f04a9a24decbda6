"""The canonical IR every stage works on: the ``GraphoptModule`` class and its pickling (module.py, pickling.py), node
and parameter helpers (nodes.py), shapes and runs (shapes.py), example inputs (inputs.py), the layer view of a graph
and the name patterns that select layers (layers.py, patterns.py), and graph rewrites several stages share
(batch_norm.py).

May import: graphopt.errors, graphopt.util, graphopt.kernels.
"""
