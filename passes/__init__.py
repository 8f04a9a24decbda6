"""Built-in passes, one module each; importing this package registers them by name."""

from graphopt.passes import dce, fuse, remove_identity  # noqa: F401

BUILTIN_MODULES = ("dce", "fuse", "remove_identity")
