"""Run by torchrun in tests/test_two_tower.py: the in-batch softmax with the item vectors gathered across 2 gloo
ranks (deepfm.two_tower.in_batch_softmax_loss) is the single-process loss on the concatenated batch, and each
rank's items get the gradient of every rank's loss.

    torchrun --standalone --nproc_per_node=2 tests/two_tower_dist.py
"""
from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repo, not tests/

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from deepfm.two_tower import in_batch_softmax_loss  # noqa: E402

B, K, T = 4, 3, 0.5


def reference(u: torch.Tensor, items: torch.Tensor, index: torch.Tensor, log_q: torch.Tensor, rows: slice) -> torch.Tensor:
    """The loss of the rows ``rows`` over all items of the whole batch, written out: logits <u, v> / T - log q,
    the other columns holding a row's own item masked, cross entropy against the row's own column."""
    own = torch.arange(rows.start, rows.stop)
    logits = u[rows] @ items.T / T - log_q.unsqueeze(0)
    hit = index[rows].unsqueeze(1) == index.unsqueeze(0)
    hit[torch.arange(len(own)), own] = False
    return torch.nn.functional.cross_entropy(logits.masked_fill(hit, float("-inf")), own)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        g = torch.Generator().manual_seed(5)
        u_all, i_all = torch.randn(world * B, K, generator=g), torch.randn(world * B, K, generator=g)
        index = torch.tensor([0, 1, 2, 3, 4, 1, 6, 0][:world * B])     # items 0 and 1 on both ranks: hits across ranks
        log_q = torch.log(torch.rand(world * B, generator=g) * 0.5 + 0.01)
        labels = torch.ones(world * B)
        mine, other = slice(rank * B, (rank + 1) * B), slice((1 - rank) * B, (2 - rank) * B)

        # 1. the gathered loss: each rank's loss is its rows over every rank's items; their mean is the
        #    single-process loss on the concatenated batch, and the gradients are that loss's (x world: the
        #    ranks' losses are summed by the backward of the gather, as DDP's averaging expects)
        u, i = u_all[mine].clone().requires_grad_(), i_all[mine].clone().requires_grad_()
        loss = in_batch_softmax_loss(u, i, index[mine], log_q[mine], labels[mine], T)
        loss.backward()
        ur, ir = u_all.clone().requires_grad_(), i_all.clone().requires_grad_()
        whole = in_batch_softmax_loss(ur, ir, index, log_q, labels, T, gather=False)
        (whole * world).backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        assert_close(mean / world, whole.detach())
        assert_close(loss.detach(), reference(u_all, i_all, index, log_q, mine))
        assert_close(u.grad, ur.grad[mine])
        assert_close(i.grad, ir.grad[mine])

        # 2. only rank 1's loss backpropagated: rank 0's items still get its gradient, the reference's
        i2 = i_all[mine].clone().requires_grad_()
        loss2 = in_batch_softmax_loss(u_all[mine], i2, index[mine], log_q[mine], labels[mine], T)
        (loss2 * float(rank == 1)).backward()
        if rank == 0:
            ir2 = i_all.clone().requires_grad_()
            want = torch.autograd.grad(reference(u_all, ir2, index, log_q, other), ir2)[0][mine]
            assert want.abs().sum() > 0.1, want
            assert_close(i2.grad, want)
        print(f"two_tower_dist ok rank {rank}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
