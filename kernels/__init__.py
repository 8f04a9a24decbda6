"""Custom kernels used by lowered graphs: a torch reference and a fast path per op (filled by the sparse issue)."""
