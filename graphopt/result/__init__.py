"""Stage 6, the user's result: ``OptimizeResult`` (optimize_result.py), the write-back into the user's own model class
and its Hugging Face config (writeback*.py, hf_config.py), and ``graphopt.save``/``graphopt.load`` (saving.py,
saving_modules.py, graph_json.py).

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.analysis, graphopt.pipeline, graphopt.quant,
graphopt.export, graphopt.kernels.
"""
