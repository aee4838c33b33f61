"""Run by tests/test_ddp.py under torchrun (2 gloo processes): checks the fastff.distributed
reductions against one process seeing the whole global batch; rank 0 writes JSON results."""
import copy
import json
import sys

import torch
import torch.distributed as dist

import fastff
from fastff.distributed import all_reduce_aux, all_reduce_usage, sync_usage


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(2, world * 16, 8)                 # two global batches, identical on all ranks
    local = x[:, rank * 16:(rank + 1) * 16]
    layer = fastff.FFF(8, 3, depth=2, leaf_width=2, usage="hard")
    moe = fastff.MoE(8, 3, experts=4, expert_width=2)
    results = {}

    # all_reduce_aux: the hard route fractions become those of the global batch
    for name, m in (("fff", layer), ("moe", moe)):
        ref = copy.deepcopy(m)
        m(local[0])
        all_reduce_aux(m)
        ref(x[0])
        results[f"aux_{name}_fraction_diff"] = (m.aux["route_fraction"] - ref.aux["route_fraction"]).abs().max().item()
        # the differentiable record stays local (the loss is linear in it; DDP averages the gradients)
        results[f"aux_{name}_prob_is_local"] = bool(m.aux["route_prob"].requires_grad)

    # all_reduce_usage (one shot): local counts -> global counts
    one_shot, ref = copy.deepcopy(layer), copy.deepcopy(layer)
    one_shot.reset_usage(), ref.reset_usage()
    one_shot(local[0])
    all_reduce_usage(one_shot)
    ref(x[0])
    results["one_shot_usage_diff"] = max((one_shot.leaf_usage - ref.leaf_usage).abs().max().item(),
                                         (one_shot.node_usage - ref.node_usage).abs().max().item())
    results["one_shot_total"] = one_shot.leaf_usage.sum().item()

    # sync_usage: every training forward adds the global counts; eval forwards add nothing
    synced, ref = copy.deepcopy(layer), copy.deepcopy(layer)
    synced.reset_usage(), ref.reset_usage()
    handles = sync_usage(synced)
    for b in range(2):
        synced(local[b])
        ref(x[b])
    synced.eval()(local[0])
    results["sync_usage_diff"] = max((synced.leaf_usage - ref.leaf_usage).abs().max().item(),
                                     (synced.node_usage - ref.node_usage).abs().max().item())
    results["sync_total"] = synced.leaf_usage.sum().item()
    for h in handles:
        h.remove()

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
