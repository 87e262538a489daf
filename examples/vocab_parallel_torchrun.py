"""Vocabulary-parallel pg_error: each rank holds a slice of the output layer.

    torchrun --nproc-per-node 2 examples/vocab_parallel_torchrun.py

A language-model policy's output layer (vocabulary x hidden) is split by rows
over the ranks, as Megatron's column-parallel layer does it: rank r computes
the logits of its classes [start, start + size) only, and no rank ever holds
the logits of the whole vocabulary. ``pgext.distributed.pg_error`` gives every
rank the loss over the whole vocabulary; backward gives each rank the
gradient of its slice of the layer.

The script runs on CPU with the Gloo backend. Every rank draws the same batch
(same seed), so it can also compute the single-device loss from the full
layer, and it checks that the two agree. A vocabulary that the world size
does not divide gives uneven shards, passed with ``vocab_start``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import pgext
except ImportError:  # running from a checkout without installing: the package is next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pgext
import pgext.distributed

BETA = 0.01  # entropy bonus: total = policy_loss - BETA * entropy_loss


def shard_bounds(vocab: int, world: int, rank: int):
    """[start, start + size) of this rank: sizes differ by at most one."""
    base, extra = divmod(vocab, world)
    size = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, size


def loss_of(logit, action, return_, mask, vocab_start=None):
    data = pgext.pg_data(logit, action, return_)
    if vocab_start is None:
        loss = pgext.pg_error(data, weight=mask, reduction="sum")
    else:
        loss = pgext.distributed.pg_error(data, vocab_start=vocab_start, weight=mask, reduction="sum")
    tokens = mask.sum()
    return loss.policy_loss / tokens, loss.entropy_loss / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    args = p.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    start, size = shard_bounds(args.vocab, world, rank)

    # the same batch and the same full layer on every rank (a real model would
    # initialize only its slice)
    torch.manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.dim)
    layer = torch.randn(args.vocab, args.dim) / args.dim ** 0.5
    action = torch.randint(0, args.vocab, (args.batch, args.seq))
    return_ = torch.randn(args.batch, args.seq) + 1
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,))
    mask = (torch.arange(args.seq) < lengths[:, None]).float()  # padding: weight 0

    # vocabulary parallel: this rank's slice of the layer and of the logits
    my_layer = layer[start:start + size].clone().requires_grad_()
    logit = hidden @ my_layer.T  # (batch, seq, size)
    policy, entropy = loss_of(logit, action, return_, mask, vocab_start=start)
    (policy - BETA * entropy).backward()

    # single device: the whole layer and the whole logits
    full = layer.clone().requires_grad_()
    ref_policy, ref_entropy = loss_of(hidden @ full.T, action, return_, mask)
    (ref_policy - BETA * ref_entropy).backward()
    ref_grad = full.grad[start:start + size]
    grad_diff = torch.tensor([(my_layer.grad - ref_grad).abs().max().item(), ref_grad.abs().max().item()])
    dist.all_reduce(grad_diff, dist.ReduceOp.MAX)

    shards = [None] * world
    dist.all_gather_object(shards, (start, size, tuple(logit.shape)))
    ok = True
    if rank == 0:
        print(f"vocabulary {args.vocab} over {world} ranks (gloo), {int(mask.sum())} tokens")
        for r, (s, n, shape) in enumerate(shards):
            print(f"rank {r}/{world}: classes [{s}, {s + n}) of {args.vocab}, logit shard {shape}")
        for name, got, want in (("policy_loss", policy, ref_policy), ("entropy_loss", entropy, ref_entropy)):
            diff = abs(got.item() - want.item())
            ok &= diff <= 1e-5 * (1 + abs(want.item()))
            print(f"{name}: sharded {got.item():.6f} single-device {want.item():.6f} |diff| {diff:.2e}")
        max_diff, scale = grad_diff.tolist()
        ok &= max_diff <= 1e-5 * scale
        print(f"output layer gradient, all shards: max |diff| {max_diff:.2e} (max |grad| {scale:.2e})")
        print(f"match: {'yes' if ok else 'no'}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
