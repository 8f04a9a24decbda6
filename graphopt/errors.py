"""One error tree for everything graphopt raises on purpose.

Every message names the part at fault (module, node or pass) and says what to do; the original exception,
when there is one, is chained with ``raise ... from``. Tests assert these messages: they are part of the API.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Root of every error graphopt raises on purpose."""


class InputError(GraphoptError, TypeError):
    """The caller passed something graphopt cannot work with (not a Module, bad example inputs, bad options)."""


class TraceError(GraphoptError):
    """Neither ``torch.export`` nor ``torch.fx.symbolic_trace`` could capture the model."""


class PipelineError(GraphoptError):
    """The pass list is wrong before anything runs: unknown name, bad options, or an ordering violation."""


class PassError(GraphoptError):
    """A pass raised while running; the message names the pass."""


class VerifyError(GraphoptError):
    """A pass left a graph that fails lint, fails to run, or changed outputs it promised to preserve."""


class GraphoptWarning(UserWarning):
    """Something was left alone on purpose (e.g. channels frozen at an op without a dependency rule)."""
