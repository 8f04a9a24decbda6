"""Helpers every stage shares and that know nothing of graphs: torch.distributed reductions (distributed.py),
progress bars (progress.py), naming the model part at fault in an error (diagnose.py), plots (plots.py), the
process's resident memory (process_memory.py).

May import: graphopt.errors.
"""
