"""Custom kernels used by lowered graphs: packed sparse formats, C kernels (built and cached on first use) exposed
as ``torch.ops.graphopt.*`` custom ops with torch reference fallbacks, and the ``SparseLinear`` module.

May import: graphopt.errors.
"""

if __name__ == "kernels":
    # This directory was reached as a top-level "kernels" because a checkout's root is on sys.path (``python -m``
    # run from it). That name belongs to Hugging Face's kernels package, which transformers imports at start-up:
    # hand the import over to it, so running from a checkout behaves like running from an install.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError(f"'kernels' resolved to graphopt's kernels directory ({os.path.dirname(__file__)}) because "
                          f"{_checkout} is on sys.path, and no other 'kernels' package is installed; graphopt's "
                          "kernels are imported as graphopt.kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds once this body has run
    _spec.loader.exec_module(_real)
else:
    from graphopt.kernels import ops  # noqa: F401  (registers torch.ops.graphopt.sparse_linear / act_sparse_linear)
    from graphopt.kernels.build import library
    from graphopt.kernels.choose import Choice, choose_format
    from graphopt.kernels.formats import FORMATS, PackedWeight, SparseFormatError, pack, unpack, validate
    from graphopt.kernels.modules import QuantLinear, SparseLinear
    from graphopt.kernels.quant_embedding import QuantEmbedding
    from graphopt.kernels.quant_format import QuantizedWeight, dequantize, pack_quantized, quantize_rtn, unpack_codes

    __all__ = ["FORMATS", "Choice", "PackedWeight", "QuantEmbedding", "QuantLinear", "QuantizedWeight", "SparseFormatError", "SparseLinear",
               "choose_format", "dequantize", "library", "pack", "pack_quantized", "quantize_rtn", "unpack", "unpack_codes",
               "validate"]
