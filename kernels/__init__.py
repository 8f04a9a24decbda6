"""Custom kernels used by lowered graphs: packed sparse formats, C kernels (built and cached on first use) exposed
as ``torch.ops.graphopt.*`` custom ops with torch reference fallbacks, and the ``SparseLinear`` module.

May import: graphopt.errors.
"""

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
