"""Built-in passes, one module each; importing this package registers them by name."""

from graphopt.passes import channel_prune, dce, fuse, remove_identity  # noqa: F401

BUILTIN_MODULES = ("channel_prune", "dce", "fuse", "remove_identity")
