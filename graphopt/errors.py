"""One error tree for everything graphopt raises on purpose.

Every message names the part at fault (module, node or pass) and says what to do; the original exception,
when there is one, is chained with ``raise ... from``. Tests assert these messages: they are part of the API.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Root of every error graphopt raises on purpose."""


class InputError(GraphoptError, TypeError):
    """The caller passed something graphopt cannot work with (not a Module, bad example inputs, bad options)."""


class MissingDataError(InputError):
    """A pass needs data the caller did not give. ``keyword`` names the ``graphopt.optimize`` argument that
    supplies it and ``problem`` says what is missing without the remedy, so a front end can name its own way
    to give the data (the CLI says ``--calib``) instead of the Python keyword the message names."""

    def __init__(self, problem: str, remedy: str, *, keyword: str, sep: str = ": "):
        super().__init__(f"{problem}{sep}{remedy}")
        self.problem, self.remedy, self.keyword, self.sep = problem, remedy, keyword, sep

    def __reduce__(self):  # the default would call __init__ with the message alone (pickling, torch.distributed)
        return _missing_data, (self.problem, self.remedy, self.keyword, self.sep)


def _missing_data(problem: str, remedy: str, keyword: str, sep: str) -> MissingDataError:
    return MissingDataError(problem, remedy, keyword=keyword, sep=sep)


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


class WritebackError(GraphoptError):
    """``to_model()`` cannot rebuild the user's own model class so that it computes what the optimized graph does."""


class SaveError(GraphoptError):
    """The model holds something graphopt cannot save without pickling code (an op off the allowlist, ...)."""


class LoadError(GraphoptError):
    """A saved file is corrupt, from another graphopt format, or does not match the model given to load."""
