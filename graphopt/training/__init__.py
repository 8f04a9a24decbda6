"""Fine-tuning an optimized graph in a plain loop (``graphopt.finetune``): distillation, mixed precision, DDP.

May import: graphopt.errors, graphopt.util, graphopt.graph.
"""

from graphopt.training.loop import data_parallel, distillation_loss, finetune, finetune_callback, unfreeze

__all__ = ["data_parallel", "distillation_loss", "finetune", "finetune_callback", "unfreeze"]
