"""Observers: what a quantizer watches during calibration, and the clipping range it picks from what it saw.

Every observer keeps the running minimum and maximum (per tensor, or per channel along ``axis``); ``range()``
turns them into the (low, high) interval to quantize. The kinds differ only in that last step:

| name | range |
|---|---|
| ``minmax`` | smallest and largest value seen |
| ``moving-average`` | exponential moving average (``momentum``) of each batch's min and max |
| ``percentile`` | the ``percentile`` (e.g. 99.99) and its mirror of a value sample (outliers clipped) |
| ``mse`` | the clip range, among 64 shrinkings of the min-max range, with the least quantize-dequantize error |

Sample-based observers (``percentile``, ``mse``) keep a bounded random sample of the values they see (at most
``SAMPLE_LIMIT``), so calibration memory does not grow with the data.

In a torch.distributed job each rank observes its own batches; before the scales are frozen every observer
``merge``s the ``state()`` of all ranks (calibrate.freeze): min of minima, max of maxima, the mean of the moving
averages, the joined samples. The ranges, and so the scales, are then bit-identical on every rank.
"""

from __future__ import annotations

import torch

SAMPLE_LIMIT = 1 << 20
OBSERVERS = ("minmax", "moving-average", "percentile", "mse")


_EPS = 1e-8


def qparams_from_range(low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """(scale, zero_point) covering [low, high] (always widened to include 0, so 0 is exact).

    Symmetric: scale = max|x| / 127 and the zero point is the middle of the range (0 for int8, 128 for uint8), so
    -128 is never used and weights are symmetric as onnxruntime's int8 kernels expect.
    """
    low, high = torch.clamp(low.float(), max=0.0), torch.clamp(high.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-low, high)
        scale = torch.clamp(amax / ((qmax - qmin) // 2), min=_EPS)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = torch.clamp((high - low) / (qmax - qmin), min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


class Observer:
    """Running min/max of the tensors it is shown (per tensor, or per channel along ``axis``)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.batches = 0

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return x.min(), x.max()
        flat = x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def update(self, x: torch.Tensor) -> None:
        """Fold one tensor into the statistics."""
        x = x.detach().float()
        low, high = self._reduce(x)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.batches += 1

    def range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (low, high) interval to quantize."""
        return self.low, self.high

    def state(self, world: int = 1) -> dict:
        """What this observer saw, as CPU tensors, for ``merge`` on other ranks (``world``: how many ranks)."""
        return {"low": _cpu(self.low), "high": _cpu(self.high), "batches": self.batches}

    def merge(self, states: list[dict]) -> None:
        """Become the observer of every rank's data, given all ranks' ``state()`` in rank order.

        Every rank merges the same list in the same order, so every rank ends with bit-identical statistics."""
        seen = [s for s in states if s["low"] is not None]
        self.batches = sum(s["batches"] for s in states)
        if not seen:
            return
        device = self.low.device if self.low is not None else torch.device("cpu")
        self.low = _fold(torch.minimum, [s["low"] for s in seen]).to(device)
        self.high = _fold(torch.maximum, [s["high"] for s in seen]).to(device)


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min and max: one odd batch moves the range by ``momentum`` only."""

    def __init__(self, axis: int | None = None, momentum: float = 0.1):
        super().__init__(axis)
        self.momentum = momentum
        self.avg_low = self.avg_high = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        low, high = self._reduce(x.detach().float())
        if self.avg_low is None:
            self.avg_low, self.avg_high = low, high
        else:
            m = self.momentum
            self.avg_low = (1 - m) * self.avg_low + m * low
            self.avg_high = (1 - m) * self.avg_high + m * high

    def range(self, qmin, qmax, symmetric):
        return self.avg_low, self.avg_high

    def state(self, world: int = 1) -> dict:
        return {**super().state(world), "avg_low": _cpu(self.avg_low), "avg_high": _cpu(self.avg_high)}

    def merge(self, states: list[dict]) -> None:
        """The mean over ranks of each rank's moving averages (and the overall min/max)."""
        super().merge(states)
        seen = [s for s in states if s["avg_low"] is not None]
        if seen:
            device = self.low.device
            self.avg_low = (_fold(torch.add, [s["avg_low"] for s in seen]) / len(seen)).to(device)
            self.avg_high = (_fold(torch.add, [s["avg_high"] for s in seen]) / len(seen)).to(device)


class _SampleObserver(Observer):
    """Keeps a bounded uniform sample of the values (per-tensor observers only)."""

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.generator = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if self.axis is not None:  # per-channel tensors are weights: the whole tensor is the sample
            self.samples = [x.detach().float()]
            return
        flat = x.detach().float().reshape(-1)
        share = SAMPLE_LIMIT // 8  # each batch adds at most this many values; old ones are thinned below
        if flat.numel() > share:
            flat = flat[torch.randint(0, flat.numel(), (share,), generator=self.generator)]
        self.samples.append(flat)
        self.kept += flat.numel()
        if self.kept > SAMPLE_LIMIT:
            joined = torch.cat(self.samples)
            keep = torch.randperm(joined.numel(), generator=self.generator)[: SAMPLE_LIMIT // 2]
            self.samples, self.kept = [joined[keep]], SAMPLE_LIMIT // 2

    def sample(self) -> torch.Tensor:
        """All kept values, flat (per tensor) or as the last tensor seen (per channel)."""
        return torch.cat(self.samples) if self.axis is None else self.samples[-1]

    def state(self, world: int = 1) -> dict:
        """Per tensor, a sample thinned to this rank's share of SAMPLE_LIMIT, so the merged one stays bounded.
        Per channel the sample is the weight itself, the same on every rank: it stays here."""
        if self.axis is not None or not self.samples:
            return {**super().state(world), "sample": None}
        values = self.sample()
        share = SAMPLE_LIMIT // world
        if values.numel() > share:
            values = values[torch.randperm(values.numel(), generator=self.generator)[:share]]
        return {**super().state(world), "sample": values.cpu()}

    def merge(self, states: list[dict]) -> None:
        """Every rank's per-tensor sample joined in rank order (per-channel samples are kept)."""
        super().merge(states)
        parts = [s["sample"] for s in states if s["sample"] is not None]
        if self.axis is None and parts:
            device = self.low.device
            self.samples = [torch.cat(parts).to(device)]
            self.kept = self.samples[0].numel()


class PercentileObserver(_SampleObserver):
    """Clip at the ``percentile`` of the values (and ``100 - percentile`` below): outliers do not set the scale."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99):
        super().__init__(axis)
        self.percentile = percentile

    def range(self, qmin, qmax, symmetric):
        if self.axis is not None:
            return self.low, self.high  # weights: every value is real signal, nothing is an outlier
        values = self.sample()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        low, high = torch.quantile(values, q)
        return torch.minimum(low, self.high), torch.maximum(torch.minimum(high, self.high), low)


class MseObserver(_SampleObserver):
    """Search 64 shrinkings of the min-max range for the one with the least quantize-dequantize MSE."""

    STEPS = 64

    def range(self, qmin, qmax, symmetric):
        values = self.sample()
        if self.axis is not None:
            values = values.transpose(0, self.axis).reshape(values.shape[self.axis], -1)
        else:
            values = values.reshape(1, -1)
        best_err = torch.full((values.shape[0],), float("inf"))
        best_low, best_high = self.low.clone().reshape(-1), self.high.clone().reshape(-1)
        for i in range(self.STEPS):
            alpha = 1.0 - i / (self.STEPS + 8)  # down to ~12% of the full range
            low, high = self.low.reshape(-1) * alpha, self.high.reshape(-1) * alpha
            scale, zp = qparams_from_range(low, high, qmin, qmax, symmetric)
            s, z = scale.reshape(-1, 1), zp.reshape(-1, 1).float()
            deq = (torch.clamp(torch.round(values / s) + z, qmin, qmax) - z) * s
            err = (deq - values).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_low, best_high = torch.where(better, low, best_low), torch.where(better, high, best_high)
        shape = self.low.shape
        return best_low.reshape(shape), best_high.reshape(shape)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def _fold(op, tensors: list[torch.Tensor]) -> torch.Tensor:
    """op(op(t0, t1), t2)...: in list order, so every rank adds in the same order."""
    out = tensors[0]
    for t in tensors[1:]:
        out = op(out, t)
    return out


def make_observer(kind: str, axis: int | None = None, percentile: float = 99.99) -> Observer:
    """An observer by name (see the module docstring)."""
    if kind == "minmax":
        return Observer(axis)
    if kind == "moving-average":
        return MovingAverageObserver(axis)
    if kind == "percentile":
        return PercentileObserver(axis, percentile)
    if kind == "mse":
        return MseObserver(axis)
    raise ValueError(f"unknown observer '{kind}'; choose one of {', '.join(OBSERVERS)}")
