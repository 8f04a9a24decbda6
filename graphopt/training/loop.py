"""``graphopt.finetune``: a small, honest recovery-training loop for compressed models.

After pruning or quantization a short fine-tune recovers most of the lost accuracy. This loop does only that:
Adam with a cosine-decayed learning rate over mini-batches, an optional teacher (the original model) whose
softened outputs the student matches (knowledge distillation: KL divergence at a temperature, mixed with the
task loss), optional mixed precision (bf16 autocast on CPU, fp16 or bf16 on GPU), a progress line, and the
loss history returned for the caller to check or plot.

The module trains in train mode, as in eager training: on graphopt's graphs (GraphoptModule, see
graph/module.py) BatchNorm normalizes with batch statistics and updates its running ones, dropout is active, and
fake-quant quantizers use the straight-through estimator (QAT). Afterwards every submodule is put back into the
mode it was in. A module whose graph fixes its mode (a raw ``torch.export`` module, whose ``.train()`` raises)
trains as it was captured.

The module lives in ``training/loop.py``, not ``finetune.py``: ``graphopt.finetune`` is the function, and a submodule
of the same name would be shadowed by it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from graphopt.util import distributed as ranks
from graphopt.errors import GraphoptWarning, InputError
from graphopt.graph.module import modes_kept
from graphopt.util.progress import progress

__all__ = ["finetune", "distillation_loss", "finetune_callback", "unfreeze", "data_parallel"]
_AMP = {None: None, False: None, True: torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16}


def finetune(
    module: nn.Module,
    data: Any,
    *,
    epochs: int,
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    amp: str | bool | None = None,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    distributed: bool | None = None,
) -> list[float]:
    """Train ``module`` in place for ``epochs`` passes over ``data``; returns the mean loss of every epoch.

    ``data`` is a pair of tensors ``(inputs, targets)`` (shuffled into batches of ``batch_size`` each epoch) or
    a re-iterable of batches ``(inputs, targets)`` (a list, a DataLoader). ``loss_fn(output, target)`` is the task
    loss (default: cross entropy). With a ``teacher`` the loss is ``alpha * T^2 * KL(teacher_T || student_T) +
    (1 - alpha) * task`` at temperature ``T``; batches of inputs alone are then allowed (pure distillation).
    ``amp``: None (off), ``"bf16"`` / ``True`` (bfloat16 autocast, also on CPU) or ``"fp16"`` (GPU only).

    ``distributed``: in a torch.distributed job (None: whenever a process group of 2+ ranks is initialized) the
    module trains under DistributedDataParallel on each rank's own ``data``: gradients are averaged, so the
    parameters stay equal on every rank; ranks may hold different numbers of batches; buffers (BatchNorm
    statistics) end as rank 0's; the returned losses are means over all ranks. A module the caller already
    wrapped (DDP, FSDP) is trained as it is.
    """
    _check_options(epochs, lr, amp, alpha, temperature)
    device = _device_of(module)
    dtype = _AMP[amp]
    if dtype is torch.float16 and device.type != "cuda":
        raise InputError("finetune: amp='fp16' needs a CUDA model; on CPU use amp='bf16'")
    params = _trainable(module)
    batches = _batches(data, batch_size, seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(batches(0))))
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    loss_fn = loss_fn or F.cross_entropy
    if teacher is not None:
        _set_mode(teacher, False)
    history: list[float] = []
    with modes_kept(module):  # afterwards every submodule is back in its own mode, whatever happened
        _set_mode(module, True)
        model = data_parallel(module, distributed)
        for epoch in range(epochs):
            total, count = 0.0, 0
            with _joined(model):
                for batch in progress(batches(epoch), f"fine-tune epoch {epoch + 1}/{epochs}"):
                    x, y = _split(batch, device, teacher is not None)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        out = model(x)
                        loss = _loss(out, y, x, loss_fn, teacher, temperature, alpha)
                    _step(loss, opt, sched, scaler)
                    total, count = total + float(loss.detach()), count + 1
            if model is not module:
                total, count = ranks.sum_numbers([total, count])
            history.append(total / max(count, 1))
        if model is not module or (ranks.active() and _is_fsdp(module)):  # BatchNorm statistics: rank 0's
            ranks.broadcast_buffers(module)
    return history


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters finetune trains; InputError when there are none, a warning naming how many stay fixed."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"finetune: {type(module).__name__} has no trainable parameters (all have "
                         "requires_grad=False); hint: call p.requires_grad_() on those to train")
    frozen = sum(1 for p in module.parameters() if not p.requires_grad)
    if frozen:
        warnings.warn(f"finetune: {frozen} parameter tensors have requires_grad=False and stay fixed",
                      GraphoptWarning, stacklevel=3)
    return params


def _step(loss: torch.Tensor, opt, sched, scaler) -> None:
    """Backward, one optimizer step (through the fp16 GradScaler when there is one), one scheduler step."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    sched.step()


def data_parallel(module: nn.Module, distributed: bool | None = None) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when it should train that way (see ``finetune``), else
    ``module`` itself. InputError for ``distributed=True`` without a process group."""
    wrapped = isinstance(module, DistributedDataParallel) or _is_fsdp(module)
    if distributed is True and not ranks.active():
        raise InputError("finetune: distributed=True needs an initialized torch.distributed process group with 2 "
                         "or more ranks; launch with torchrun and call torch.distributed.init_process_group()")
    if wrapped or distributed is False or not ranks.active():
        return module
    device = _device_of(module)
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def _joined(model: nn.Module):
    """DDP's join: a rank that runs out of batches keeps answering the others' gradient all-reduces."""
    return model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened class distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def finetune_callback(data: Any, **options: Any) -> Callable[[fx.GraphModule, int], None]:
    """A ``finetune(gm, step)`` hook for iterative pruning (``PruneChannels(steps=n, finetune=...)``): each call
    fine-tunes the graph pruned so far with ``options`` (``epochs`` and ``lr`` required), seeded by the step."""
    def recover(gm: fx.GraphModule, step: int) -> None:
        finetune(gm, data, **{"seed": step + 1, **options})
    return recover


def unfreeze(module: nn.Module) -> nn.Module:
    """Make every floating-point parameter trainable (some passes leave rewritten weights with
    ``requires_grad=False``); returns the module."""
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return module


def _loss(out, y, x, loss_fn, teacher, temperature, alpha):
    if teacher is None:
        return loss_fn(out, y)
    with torch.no_grad():
        soft = teacher(x)
    kd = distillation_loss(out, soft, temperature)
    return kd if y is None else alpha * kd + (1 - alpha) * loss_fn(out, y)


def _batches(data: Any, batch_size: int, seed: int) -> Callable[[int], list]:
    """A function of the epoch giving that epoch's list of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].shape[:1] == data[1].shape[:1] and data[0].dim() > 1:
        x, y = data

        def shuffled(epoch: int) -> list:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
        return shuffled
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise InputError("finetune: data must be (inputs, targets) tensors or a re-iterable of batches, "
                         f"got {type(data).__name__}")
    fixed = data if isinstance(data, (list, tuple)) else None
    if fixed is not None and not fixed:
        raise InputError("finetune: data holds no batches")
    return lambda epoch: fixed if fixed is not None else list(data)


def _split(batch: Any, device: torch.device, distilling: bool):
    if isinstance(batch, torch.Tensor):
        if not distilling:
            raise InputError("finetune: a batch of inputs without targets needs a teacher= to distill from")
        return batch.to(device), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0].to(device), batch[1].to(device)
    raise InputError(f"finetune: each batch must be (inputs, targets) or an inputs tensor, got {type(batch).__name__}")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _set_mode(module: nn.Module, training: bool) -> None:
    """train()/eval(); a raw torch.export module raises on it (its graph fixes the mode) and trains as captured."""
    try:
        module.train(training)
    except (RuntimeError, NotImplementedError):
        pass


def _check_options(epochs: int, lr: float, amp: Any, alpha: float, temperature: float) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"finetune: epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise InputError(f"finetune: lr must be positive, got {lr!r}")
    if amp not in _AMP:
        raise InputError(f"finetune: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if not 0 <= alpha <= 1 or not temperature > 0:
        raise InputError(f"finetune: alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
