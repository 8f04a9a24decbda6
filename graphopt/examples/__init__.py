"""Built-in examples: small models (models.py), the bundled digits data (digits.py), ``make demo`` (demo.py).

May import: everything but graphopt.cli.
"""

from graphopt.examples.models import ExampleNet, ResidualBlock, example_model, tiny_llama

__all__ = ["ExampleNet", "ResidualBlock", "example_model", "tiny_llama"]
