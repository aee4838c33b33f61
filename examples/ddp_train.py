"""Train a small FFF regression model with DistributedDataParallel (gloo, CPU).

Two processes on this machine:
    torchrun --nproc_per_node 2 examples/ddp_train.py --steps 5 --out ddp.safetensors
The same run in one process on the same global batches (identical parameters up to float
rounding):
    python examples/ddp_train.py --steps 5 --out single.safetensors
Every rank takes an equal, contiguous share of each global batch. The loss is
``mse + 0.1 · hardening_loss + load_balancing_loss(alpha=0.1)`` with the route fractions
all-reduced (``fastff.distributed.all_reduce_aux``), and the FFF usage counters kept global
(``fastff.distributed.sync_usage``). Rank 0 writes the trained model with ``fastff.save``.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import fastff
from fastff.distributed import all_reduce_aux, sync_usage

IN, HIDDEN, OUT = 16, 32, 4


def make_model(depth: int) -> nn.Sequential:
    """FFF (IN -> HIDDEN, hard usage counters) -> GELU -> Linear (HIDDEN -> OUT)."""
    return nn.Sequential(fastff.FFF(IN, HIDDEN, depth, leaf_width=4, usage="hard"), nn.GELU(),
                         nn.Linear(HIDDEN, OUT))


def make_data(steps: int, global_batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (steps, global_batch, IN) and targets (steps, global_batch, OUT) of a random
    teacher, identical on every rank."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, global_batch, IN, generator=g)
    teacher = torch.randn(IN, OUT, generator=g)
    return x, torch.tanh(x @ teacher)


def train(steps: int, global_batch: int, depth: int = 3, lr: float = 0.1, seed: int = 0) -> nn.Module:
    """Run ``steps`` SGD steps; distributed if ``torch.distributed`` is initialised.
    Returns the trained (unwrapped) model."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} must be divisible by the {world} processes")
    torch.manual_seed(seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = make_model(depth)
    sync_usage(model)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xs, ys = make_data(steps, global_batch, seed)
    share = global_batch // world
    for step in range(steps):
        x = xs[step, rank * share:(rank + 1) * share]
        y = ys[step, rank * share:(rank + 1) * share]
        pred = net(x)
        all_reduce_aux(model)
        loss = (nn.functional.mse_loss(pred, y) + 0.1 * fastff.hardening_loss(model)
                + fastff.load_balancing_loss(model, alpha=0.1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if world > 1:  # the loss value is local; its mean over ranks is the global-batch loss
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f}")
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the trained model here (fastff.save)")
    args = parser.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        model = train(args.steps, args.global_batch, args.depth, args.lr, args.seed)
        if args.out and (not distributed or dist.get_rank() == 0):
            fastff.save(model, args.out)
            print(f"saved {args.out}")
    finally:
        if distributed:
            # The DDP wrapper sits in reference cycles that keep the process group alive; if it
            # were freed only at interpreter exit, gloo's worker threads could still try to take
            # the GIL during finalisation, and the process would abort ("terminate called without
            # an active exception"). Free it now, while the interpreter is fully alive.
            gc.collect()
            dist.barrier()  # no rank tears the group down while another still uses it
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
