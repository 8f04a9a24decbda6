"""One rank of tests/test_distributed.py, launched twice by torchrun (gloo, CPU): each rank calibrates, prunes,
removes layers and fine-tunes on its own data and saves what it got to ``OUT/rank{r}.pt`` for the test to compare.

Rank r's data comes from seed r and is scaled by 1 + r, so per-rank statistics really differ. Every rank can
rebuild every rank's data, which lets rank 0 also compute the single-process answer on all of it (``union``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import graphopt
from graphopt.util import distributed
from graphopt.examples.models import example_model
from graphopt.graph.inputs import ExampleInputs
from graphopt.passes.remove_layers import RemoveLayers
from graphopt.quant import prepare_qat, quantizers
from graphopt.training.loop import finetune

OBSERVERS = ("minmax", "moving-average", "percentile", "mse")


def images(rank: int, count: int = 3, batch: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(batch, 3, 32, 32, generator=gen) * (1 + rank) for _ in range(count)]


def labelled(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2000 + rank)
    return [(x, torch.randint(0, 10, (x.shape[0],), generator=gen)) for x in images(rank, count)]


def union(world: int) -> list[torch.Tensor]:
    return [x for r in range(world) for x in images(r)]


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def scales(gm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (q.scale.detach().clone(), q.zero_point.clone()) for n, q in quantizers(gm).items()}


def optimized(model, passes, x, batches):
    return graphopt.optimize(model, passes, x, calib_data=batches)


def plans(model, x, batches, world) -> dict:
    """Taylor pruning, layer-removal scores, observer scales, sensitivities, activation zero counts, one-shot
    sparsity (SparseGPT, Wanda) and BatchNorm re-estimation."""
    out = {}
    out["taylor"] = state(optimized(model, "prune-channels:ratio=0.5,importance=taylor", x, batches).module)
    for criterion in ("block-influence", "output-error", "angular"):
        report = optimized(model, [RemoveLayers(n=1, criterion=criterion, protect=())], x, batches).report
        out[f"remove/{criterion}"] = report.records[0].stats
    for observer in OBSERVERS:
        result = optimized(model, f"fake-quant:observer={observer}", x, batches)
        out[f"scales/{observer}"] = scales(result.module)
    stats = optimized(model, "fake-quant:keep_float=1,sensitivity_batches=8", x, batches).report.records[0].stats
    out["sensitivity"] = (stats["sensitivity"], stats["kept_float"])
    out["zeros"] = zero_fractions(batches)
    out["sparsegpt"] = state(optimized(model, "sparsify:method=sparsegpt", x, batches).module)
    out["wanda"] = state(optimized(model, "sparsify:method=wanda,pattern=2:4,skip_unfit=true", x, batches).module)
    out["recalibrate-bn"] = state(optimized(model, "prune-channels:ratio=0.5,recalibrate-bn", x, batches).module)
    return out


def zero_fractions(batches) -> list[float]:
    from graphopt.passes.activation_sparsity import zero_fractions as measure

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    gm = graphopt.trace(mlp, (batches[0][:1],))
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    fractions = measure(gm, linears, [ExampleInputs.of((b,)) for b in batches])
    return [fractions[n][0] for n in linears]


def training(model, x, rank: int, world: int) -> dict:
    """DDP fine-tuning of a pruned model (uneven batch counts), one even step against single-process training,
    a layer-removed model, QAT with learnable scales, FSDP2."""
    out = {}
    pruned = optimized(model, "prune-channels:ratio=0.5", x, None).module
    out["pruned_before"] = state(pruned)
    tuned = copy.deepcopy(pruned)
    out["ddp_losses"] = finetune(tuned, labelled(rank, 3 + rank), epochs=2, lr=1e-2)
    out["ddp"] = state(tuned)

    # in train mode BatchNorm uses per-rank batch statistics (no SyncBatchNorm) and dropout draws per-rank masks,
    # so the equality with one process holds for a graph without either: DDP's averaged gradients are then the
    # big batch's
    folded = optimized(model, "fuse,remove-identity,prune-channels:ratio=0.5", x, None).module
    stepped = copy.deepcopy(folded)
    finetune(stepped, labelled(rank, 1), epochs=1, lr=1e-2)
    out["ddp_step"] = state(stepped)
    if rank == 0:
        with distributed.local_only():  # the same step on both ranks' batch at once, in one process
            alone = copy.deepcopy(folded)
            both = [(torch.cat([labelled(r, 1)[0][0] for r in range(world)]),
                     torch.cat([labelled(r, 1)[0][1] for r in range(world)]))]
            finetune(alone, both, epochs=1, lr=1e-2)
            out["single_step"] = state(alone)

    shallow = optimized(model, [RemoveLayers(n=1, criterion="output-error", protect=())], x, images(rank)).module
    out["removed_before"] = state(shallow)
    finetune(shallow, labelled(rank, 2), epochs=1, lr=1e-2)
    out["removed"] = state(shallow)

    qat = optimized(model, "fake-quant:qat=true", x, images(rank)).module
    prepare_qat(qat, learnable_scales=True)
    out["qat_before"] = state(qat)
    finetune(qat, labelled(rank, 2 + rank), epochs=1, lr=1e-3)
    out["qat"] = state(qat)
    with torch.no_grad():
        out["qat_output"] = qat(x)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(pruned)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    finetune(sharded, labelled(rank, 2), epochs=1, lr=1e-2)
    out["fsdp"] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.state_dict().items()}
    return out


def mismatch(model, x, rank: int) -> str:
    """graphopt.optimize when rank 1 holds different weights: the error every rank raises."""
    model = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            model.blocks[1].conv2.weight[0, 0, 0, 0] += 1.0
    try:
        optimized(model, "prune-channels:ratio=0.5", x, None)
    except graphopt.InputError as e:
        return str(e)
    return "no error"


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, (x,) = example_model()
    mine = images(rank)
    results = {"rank": rank, "world": world}
    results["distributed"] = plans(model, x, mine, world)
    with distributed.local_only():
        results["local"] = plans(model, x, mine, world)
        if rank == 0:
            results["union"] = plans(model, x, union(world), world)
    results.update(training(model, x, rank, world))
    results["mismatch"] = mismatch(model, x, rank)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
