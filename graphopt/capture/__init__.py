"""Stage 1, capture: a model and example inputs in, the canonical ATen graph out (``graphopt.trace``): torch.export
first, symbolic_trace as the fallback, Hugging Face models without their KV cache, size-1 guards relaxed.

May import: graphopt.errors, graphopt.util, graphopt.graph.
"""
