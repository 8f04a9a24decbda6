"""What the one-shot solvers need to know about a layer's inputs, gathered batch by batch on calibration data.

``InputStatistics`` keeps running sums (never the activations), so memory is O(in^2) whatever the amount of
calibration data, and sums from several ranks or several passes combine by plain addition. ``conv_input_rows``
turns a convolution's input into the rows a linear layer would see, so the same statistics serve convs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from graphopt.errors import InputError
from graphopt.util import distributed

__all__ = ["InputStatistics", "conv_input_rows"]


class InputStatistics:
    """Running sums over the inputs ``x`` of one linear-like layer (features in the last dim), in float64.

    Attributes (raw sums, ``None`` until the first ``add``): ``xtx`` the Gram matrix X^T X (in, in), ``sum`` the
    per-feature sum, ``sq_norm`` the per-feature sum of squares, ``count`` the number of rows seen.
    ``gram=False`` skips ``xtx`` (O(in) memory) for solvers that need only norms (Wanda).
    """

    def __init__(self, features: int | None = None, *, gram: bool = True, layer: str = "input") -> None:
        self.gram, self.layer, self.count = gram, layer, 0
        self.xtx: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sq_norm: torch.Tensor | None = None
        self.features = features
        if features is not None:
            self._allocate(features, torch.device("cpu"))

    def _allocate(self, features: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.features = features
        self.xtx = torch.zeros(features, features, **f64) if self.gram else None
        self.sum, self.sq_norm = torch.zeros(features, **f64), torch.zeros(features, **f64)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch: ``x`` of shape (..., in); every leading position is one row."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise InputError(f"{self.layer!r}: add() takes a tensor with features in the last dim, got {x!r}")
        if self.sum is None or (self.count == 0 and self.sum.device != x.device):
            self._allocate(x.shape[-1] if self.features is None else self.features, x.device)
        if x.shape[-1] != self.features:
            raise InputError(f"{self.layer!r}: got an input with {x.shape[-1]} features, the statistics hold "
                             f"{self.features}; one InputStatistics per layer input")
        rows = x.detach().reshape(-1, self.features).to(self.sum.device, torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(rows.T, rows)
        self.sum += rows.sum(0)
        self.sq_norm += rows.square().sum(0)
        self.count += rows.shape[0]

    def merge(self, other: "InputStatistics") -> "InputStatistics":
        """Add ``other``'s sums into these (data seen elsewhere: another shard, another process); returns self."""
        if other.count == 0:
            return self
        if self.count == 0 and self.features is None:
            self._allocate(other.features, other.sum.device)
        if other.features != self.features or (other.xtx is None) != (self.xtx is None):
            raise InputError(f"{self.layer!r}: cannot merge statistics of {other.features} features "
                             f"(gram={other.xtx is not None}) into {self.features} (gram={self.xtx is not None})")
        if self.xtx is not None:
            self.xtx += other.xtx.to(self.xtx.device)
        self.sum += other.sum.to(self.sum.device)
        self.sq_norm += other.sq_norm.to(self.sq_norm.device)
        self.count += other.count
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The sums as a flat list ``[xtx?, sum, sq_norm, count]`` that ranks reduce by element-wise addition,
        then ``from_tensors`` rebuilds; ``xtx`` is left out when ``gram=False``. The big tensors are the live
        buffers (no O(in^2) copy); ``count`` is a new float64 tensor of shape (1,), exact up to 2^53 rows."""
        if self.sum is None:
            raise InputError(f"{self.layer!r}: the statistics have no feature count yet; pass features= so that "
                             "a rank without data still contributes tensors of the right shape")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        return [t for t in (self.xtx, self.sum, self.sq_norm) if t is not None] + [count]

    @classmethod
    def of_rows(cls, rows: Sequence[torch.Tensor], features: int, *, gram: bool = True,
                layer: str = "input") -> "InputStatistics":
        """The statistics of ``rows`` (each (n, features)), summed over every rank when torch.distributed is
        initialized: what each data-aware solver needs for one layer, gathered the same way everywhere."""
        stats = cls(features, gram=gram, layer=layer)
        for r in rows:
            stats.add(r)
        return cls.from_tensors(distributed.sum_tensors(stats.tensors()), layer=layer)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, layer: str = "input") -> "InputStatistics":
        """Rebuild from ``tensors()`` output (possibly summed over ranks); 4 tensors mean ``gram=True``, 3 not."""
        if len(tensors) not in (3, 4):
            raise InputError(f"{layer!r}: from_tensors takes the 3 or 4 tensors tensors() returns, got {len(tensors)}")
        stats = cls(gram=len(tensors) == 4, layer=layer)
        *sums, count = tensors
        stats.xtx = sums[0].to(torch.float64) if stats.gram else None
        stats.sum, stats.sq_norm = (t.to(torch.float64) for t in sums[-2:])
        stats.features, stats.count = stats.sum.shape[0], int(round(float(count.reshape(-1)[0])))
        return stats

    def _need_rows(self) -> None:
        if self.count == 0:
            raise InputError(f"{self.layer!r}: no calibration rows were seen; run the calibration data through "
                             "the model before asking for statistics")

    @property
    def hessian(self) -> torch.Tensor:
        """2/count · X^T X: the Hessian of the mean squared layer-output error in the weights of one output row
        (SparseGPT's convention; the scale cancels out of every solver here)."""
        self._need_rows()
        if self.xtx is None:
            raise InputError(f"{self.layer!r}: the statistics were gathered with gram=False and hold no Hessian")
        return self.xtx * (2.0 / self.count)

    @property
    def mean(self) -> torch.Tensor:
        """Per-feature mean E[x_j]."""
        self._need_rows()
        return self.sum / self.count

    @property
    def column_norms(self) -> torch.Tensor:
        """Per-feature ||x_j||_2 over all rows seen (not divided by count: Wanda's score, which only ranks)."""
        return self.sq_norm.sqrt()


def _pair(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    out = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(out) != dims or any(not isinstance(v, int) or v < 0 for v in out):
        raise InputError(f"conv_input_rows: {name} must be a non-negative int or {dims} of them, got {value!r}")
    return out


def _padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """(left, right) per spatial dim; 'same' pads like torch does (the odd extra on the right)."""
    if padding == "valid":
        return [0, 0] * len(kernel)
    if padding == "same":
        if any(s != 1 for s in stride):
            raise InputError("conv_input_rows: padding='same' needs stride 1, as in torch")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [p for t in total for p in (t // 2, t - t // 2)]
    return [p for p in _pair(padding, len(kernel), "padding") for _ in range(2)]


def conv_input_rows(x: torch.Tensor, weight_shape: Sequence[int], stride: int | Sequence[int] = 1,
                    padding: int | Sequence[int] | str = 0, dilation: int | Sequence[int] = 1,
                    groups: int = 1) -> torch.Tensor:
    """The im2col rows of a conv1d/conv2d input, column order matching ``weight.reshape(out, -1)``.

    ``x`` is (N, C, L) / (N, C, H, W) (or unbatched), ``weight_shape`` (out, C/groups, *kernel). For
    ``groups == 1`` returns (N·positions, C·prod(kernel)), so ``rows @ weight.reshape(out, -1).T`` is the conv
    output with positions flattened; for ``groups > 1`` returns (groups, N·positions, C/groups·prod(kernel)), row
    block g holding what output channels [g·out/groups, (g+1)·out/groups) see, so each group gets its own Hessian.
    Zero padding only (pad another padding_mode yourself first).
    """
    kernel = tuple(weight_shape[2:])
    if len(kernel) not in (1, 2):
        raise InputError(f"conv_input_rows handles conv1d and conv2d weights, got weight shape {tuple(weight_shape)}")
    if x.dim() == len(kernel) + 1:  # unbatched input
        x = x.unsqueeze(0)
    if x.dim() != len(kernel) + 2 or x.shape[1] != weight_shape[1] * groups:
        raise InputError(f"conv_input_rows: input {tuple(x.shape)} does not fit weight {tuple(weight_shape)} "
                         f"with groups={groups}")
    stride_, dilation_ = _pair(stride, len(kernel), "stride"), _pair(dilation, len(kernel), "dilation")
    pads = _padding(padding, kernel, dilation_, stride_)
    # F.pad lists the last dim first; unfold only pads symmetrically, so pad here and unfold unpadded
    x = F.pad(x, [p for i in reversed(range(len(kernel))) for p in pads[2 * i:2 * i + 2]])
    if len(kernel) == 1:  # conv1d is a conv2d of height 1
        x, kernel, stride_, dilation_ = x.unsqueeze(2), (1, *kernel), (1, *stride_), (1, *dilation_)
    cols = F.unfold(x, kernel, dilation=dilation_, stride=stride_)  # (N, C·k, positions), channel-major
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if groups == 1:
        return rows
    return rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)
