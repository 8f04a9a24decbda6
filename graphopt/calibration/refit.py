"""Least-squares refit after input columns are removed (channel pruning of the layer's producer, FLAP-style
bias compensation): the remaining weights, and optionally the bias, are re-solved so that the layer's output
on the calibration data changes as little as possible. Needs only the Gram matrix, never the activations."""

from __future__ import annotations

import torch

from graphopt.calibration._checks import check_weight
from graphopt.errors import InputError

__all__ = ["refit_least_squares"]


def refit_least_squares(weight: torch.Tensor, xtx: torch.Tensor, kept_columns: torch.Tensor, *,
                        bias: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                        count: int | None = None, damp: float = 0.01,
                        layer: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-solve ``weight`` (out, in) for the inputs ``kept_columns`` (index tensor, in the order wanted, or a
    bool mask over the in columns). Returns ``(new_weight (out, k), new_bias)``.

    With x_i the ``count`` calibration rows summed into ``xtx`` = Σ x_i x_i^T (the raw sum, as
    ``InputStatistics.xtx``) and K the kept columns, the solve is

        min over W', b'   Σ_i ||W x_i + b − W' x_i,K − b'||² + λ ||W' − W_K||²

    * without ``mean``: b' = b (the bias is returned unchanged, ``None`` stays ``None``), normal equations
      (G_KK + λI) W'^T = G_K,: W^T + λ W_K^T with G = ``xtx``;
    * with ``mean`` (per-feature mean, needs ``count``): b' is free, i.e. an intercept. Its optimum is
      b' = b + W μ − W' μ_K (the removed columns' mean contribution folded into the bias, as FLAP does, plus the
      kept weights' change), and W' solves the same equations with the centred scatter S = G − count·μμ^T.

    λ = damp · mean(diag of the K×K matrix solved). It shrinks towards the old weights rather than to zero, so
    a refit that removes nothing returns the weight unchanged whatever ``damp``. Kept columns with no variance
    (always zero, or constant when centred) are not identifiable: they keep their old weights. Solves in
    float64, returns ``weight``'s dtype. ``InputError`` names ``layer`` on a shape problem, non-finite
    statistics, or a system still singular after damping.
    """
    check_weight(weight, layer)
    out_features, in_features = weight.shape
    kept = _kept_index(kept_columns, in_features, layer)
    g = _checked_gram(xtx, in_features, layer)
    w = weight.detach().to(g.device, torch.float64)
    mu = None
    if mean is not None:
        mu = _checked_mean(mean, count, in_features, layer).to(g.device)
        g = g - count * torch.outer(mu, mu)
    new = w[:, kept].clone()
    a = g[kept][:, kept]
    # variance below rounding of the raw second moments is no signal (centring a constant leaves ~1e-16)
    tiny = 1e-12 * xtx.diagonal().abs().max().item() if in_features else 0.0
    live = a.diagonal() > tiny
    if live.any():
        idx = live.nonzero().squeeze(1)
        a_live = a[idx][:, idx]
        lam = damp * a_live.diagonal().mean().item()
        rhs = g[kept[idx]] @ w.T + lam * new[:, idx].T
        a_live = a_live + lam * torch.eye(len(idx), dtype=torch.float64, device=g.device)
        lower, info = torch.linalg.cholesky_ex(a_live)
        if info.item() != 0:
            raise InputError(f"layer {layer!r}: the kept inputs' Gram matrix is singular even with damping "
                             f"{lam:.3g} (damp={damp}); some kept inputs are linear combinations of others on the "
                             "calibration data: use damp > 0, more calibration data, or remove those inputs too")
        new[:, idx] = torch.cholesky_solve(rhs, lower).T
    new_bias = bias
    if mu is not None:
        base = torch.zeros(out_features, dtype=torch.float64, device=g.device) if bias is None \
            else bias.detach().to(g.device, torch.float64)
        new_bias = (base + w @ mu - new @ mu[kept]).to(weight.device, weight.dtype)
    return new.to(weight.device, weight.dtype), new_bias


def _kept_index(kept: torch.Tensor, in_features: int, layer: str) -> torch.Tensor:
    """The kept columns as a LongTensor of distinct indices in range."""
    if isinstance(kept, torch.Tensor) and kept.dtype == torch.bool:
        if tuple(kept.shape) != (in_features,):
            raise InputError(f"layer {layer!r}: a bool kept_columns mask must have shape ({in_features},), "
                             f"got {tuple(kept.shape)}")
        return kept.nonzero().squeeze(1).cpu()
    if not isinstance(kept, torch.Tensor) or kept.dim() != 1 or kept.is_floating_point() or kept.is_complex():
        raise InputError(f"layer {layer!r}: kept_columns must be a 1-D integer index tensor or a bool mask")
    kept = kept.long().cpu()
    if kept.numel() and (kept.min() < 0 or kept.max() >= in_features or kept.unique().numel() != kept.numel()):
        raise InputError(f"layer {layer!r}: kept_columns must be distinct indices in [0, {in_features})")
    return kept


def _checked_gram(xtx: torch.Tensor, in_features: int, layer: str) -> torch.Tensor:
    if not isinstance(xtx, torch.Tensor) or tuple(xtx.shape) != (in_features, in_features):
        got = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise InputError(f"layer {layer!r}: xtx must be ({in_features}, {in_features}) for this weight, got {got}")
    if not torch.isfinite(xtx).all():
        raise InputError(f"layer {layer!r}: xtx contains NaN or inf; check the layer's inputs on the calibration data")
    return xtx.detach().to(torch.float64)


def _checked_mean(mean: torch.Tensor, count: int | None, in_features: int, layer: str) -> torch.Tensor:
    if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != (in_features,) or not torch.isfinite(mean).all():
        raise InputError(f"layer {layer!r}: mean must be a finite tensor of shape ({in_features},)")
    if not isinstance(count, int) or count <= 0:
        raise InputError(f"layer {layer!r}: a refit with an intercept (mean given) needs count=, the number of "
                         f"rows summed into xtx (InputStatistics.count), got {count!r}")
    return mean.detach().to(torch.float64)
