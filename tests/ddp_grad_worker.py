"""Run under torchrun by tests/test_distributed.py: one CARL step on this rank's half batch.

Writes the loss terms and the DDP-averaged gradients of rank RANK to OUT/rank{RANK}.safetensors.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from carlzoo.model import ModelConfig, build_model
from carlzoo.training import dist
from carlzoo.training.loss import CARLLoss


def main(out: str) -> None:
    assert dist.init_from_env("cpu")
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, num_prototypes=10))
    model.eval()  # running-stat BatchNorm: per-sample forward, so halves compose exactly
    ddp = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(8, 3, 16, 16, generator=g)
    xb = torch.randn(8, 3, 16, 16, generator=g)
    half = xa.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    logits = ddp(torch.cat([xa[sl], xb[sl]])).logits
    la, lb = logits.chunk(2)
    terms = CARLLoss()(la, lb, 2.0)
    terms.total.backward()
    tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    tensors["total"] = terms.total.detach().reshape(1)
    tensors["consistency"] = terms.consistency.reshape(1)
    tensors["uniform_prior"] = terms.uniform_prior.reshape(1)
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
