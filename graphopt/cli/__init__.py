"""The ``graphopt`` command line: argument parsing and error formatting (entry.py), the commands (commands.py),
loading a model by name or file (models.py), launching distributed runs (distributed.py).

May import: everything (the command line is the top of the stack).
"""

from graphopt.cli.entry import build_parser, format_error, main

__all__ = ["build_parser", "format_error", "main"]
