"""Calibration-driven, one-shot compression: statistics of layer inputs gathered on calibration data and the
solvers that use them (SparseGPT, Wanda, least-squares refit).

``InputStatistics`` streams the sums a layer's inputs need (Gram matrix, per-feature sums and squares, row
count) and combines across ranks by addition; ``conv_input_rows`` makes a convolution's input look like a linear
layer's. ``sparsegpt`` prunes with OBS weight updates, ``wanda_mask`` prunes by |W|·||x|| without updates,
``refit_least_squares`` re-solves a layer after input channels are removed, and ``damped_cholesky_inverse`` is
the damped factorization they share: pure tensor math over (out, in) matrices. ``run_sequentially`` (engine.py) is
the sequential calibration engine the data-aware passes share: the graph run over all calibration batches node by
node, each layer visited with the inputs of the already-compressed layers before it; prune_weights.py runs Wanda
and SparseGPT on it for the sparsify pass, reconstruct.py the refit for prune-channels, whitened_svd.py the
data-aware factorization for low-rank, repair_after_removal.py (with cross_refit.py) the refit to the original
model's outputs for remove-layers.

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.analysis, graphopt.kernels.
"""

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.damping import CholeskyInverse, damped_cholesky_inverse
from graphopt.calibration.refit import refit_least_squares
from graphopt.calibration.sparsegpt import sparsegpt
from graphopt.calibration.statistics import InputStatistics, conv_input_rows
from graphopt.calibration.wanda import wanda_mask

__all__ = ["CholeskyInverse", "InputStatistics", "NodeInputs", "run_sequentially", "conv_input_rows", "damped_cholesky_inverse",
           "refit_least_squares", "sparsegpt", "wanda_mask"]
