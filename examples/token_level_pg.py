"""Token-level policy-gradient step for a toy language model: pgext vs the reference.

    python examples/token_level_pg.py                         # vocab 32000, 8 x 128 tokens, cpu
    python examples/token_level_pg.py --device cuda --batch 16 --seq 512

Every token the model emitted is an action of a categorical policy over the
vocabulary, so the loss is ``pg_error`` over logits of shape (B, T, V).
Sequences have different lengths; the padding mask goes in as ``weight``:

* ``reduction='sum'`` divided by ``mask.sum()`` (used here) is the mean over the
  *real* tokens: its scale does not depend on how much padding the batch has;
* ``reduction='mean'`` divides by B*T, padding included, so the same tokens get
  a smaller loss (and gradient) in a batch with more padding. It is
  ``sum / (B*T)``; the script checks that too.

Padded tokens get weight 0, so their logits receive exactly zero gradient.

The script computes the loss with ``pgext.pg_error`` and with
``pgext.reference.pg_error`` (torch.distributions.Categorical) on the same
logits, compares values and gradients (and both against a float64 reference),
times forward+backward of the loss (median of several runs), measures the
bytes each saves for backward (``torch.autograd.graph.saved_tensors_hooks``)
and the peak memory growth of forward+backward (peak RSS on CPU, the CUDA
caching allocator's peak on GPU), then takes one Adam step with pgext's loss.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

try:
    from pgext import pg_data, pg_error
except ImportError:  # running from a checkout without installing: the package is next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pgext import pg_data, pg_error
from pgext import reference

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _measure, next to this script
from _measure import malloc_returns_big_blocks, median_seconds, peak_growth  # noqa: E402

BETA = 0.01  # entropy bonus: total = policy_loss - BETA * entropy_loss


class ToyLM(nn.Module):
    """Embedding -> one-layer GRU -> linear head over the vocabulary."""

    def __init__(self, vocab: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(tokens))
        return self.head(h)  # (B, T, V)


def make_batch(vocab: int, batch: int, seq: int, device, seed: int = 0, gamma: float = 0.99):
    """Random sequences of lengths in [seq/4, seq], a 0/1 mask and per-token returns.

    Each sequence gets one terminal reward; a token's return is that reward
    discounted by its distance to the end, minus the mean over real tokens.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=g)
    lengths[0] = seq  # at least one full sequence
    tokens = torch.randint(1, vocab, (batch, seq + 1), generator=g)
    pos = torch.arange(seq)
    mask = (pos[None, :] < lengths[:, None]).float()
    tokens[:, 1:][mask == 0] = 0  # pad id 0 after the end
    reward = torch.randn(batch, generator=g)
    steps_to_end = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0).float()
    returns = reward[:, None] * gamma ** steps_to_end
    returns = (returns - (returns * mask).sum() / mask.sum()) * mask
    return (tokens[:, :-1].to(device), tokens[:, 1:].to(device), returns.to(device), mask.to(device))


def token_loss(fn: Callable, logits, actions, returns, mask, data_cls=pg_data):
    """(policy, entropy, total): means over the real tokens."""
    out = fn(data_cls(logits, actions, returns), weight=mask, reduction="sum")
    n = mask.sum()
    policy, entropy = out.policy_loss / n, out.entropy_loss / n
    return policy, entropy, policy - BETA * entropy


def loss_and_grad(fn, logits, actions, returns, mask):
    z = logits.detach().requires_grad_(True)
    policy, entropy, total = token_loss(fn, z, actions, returns, mask)
    (grad,) = torch.autograd.grad(total, z)
    return policy.detach(), entropy.detach(), grad


def time_fwd_bwd(fn, logits, actions, returns, mask, repeats: int) -> float:
    """Median seconds of forward + backward (to the logits) of the loss, after one warm-up."""
    return median_seconds(lambda: loss_and_grad(fn, logits, actions, returns, mask), logits.device, repeats)


def saved_for_backward(fn, logits, actions, returns, mask) -> Dict[str, int]:
    """Bytes of the distinct storages autograd keeps for the loss's backward.

    'extra' leaves out storages shared with the inputs (the logits themselves
    being saved costs nothing the model did not already hold).
    """
    z = logits.detach().requires_grad_(True)
    inputs = {t.untyped_storage().data_ptr() for t in (z, actions, returns, mask)}
    storages: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = token_loss(fn, z, actions, returns, mask)[2]
    del total
    return {"total": sum(storages.values()),
            "extra": sum(n for p, n in storages.items() if p not in inputs)}


def peak_growth_of(fn, logits, actions, returns, mask) -> Optional[int]:
    """Peak memory above the starting point during forward + backward of the loss (bytes)."""
    return peak_growth(lambda: loss_and_grad(fn, logits, actions, returns, mask), logits.device)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="sequences B (default %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence T (default %(default)s)")
    p.add_argument("--dim", type=int, default=64, help="model width (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.vocab, args.batch, args.seq, args.dim, args.repeats) < 1:
        p.error("--vocab, --batch, --seq, --dim and --repeats must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        malloc_returns_big_blocks()
    torch.manual_seed(args.seed)
    model = ToyLM(args.vocab, args.dim).to(device)
    tokens, actions, returns, mask = make_batch(args.vocab, args.batch, args.seq, device, args.seed)
    with torch.no_grad():
        logits = model(tokens)
    n_real = int(mask.sum().item())
    n_all = mask.numel()
    print(f"token-level PG step: vocab {args.vocab}, batch {args.batch} x {args.seq} tokens "
          f"({n_real} real, {100 * (1 - n_real / n_all):.0f}% padding), {device}, logits {tuple(logits.shape)} "
          f"{logits.dtype} = {logits.numel() * logits.element_size() / 2**20:.1f} MiB")
    print("loss = pg_error(..., weight=mask, reduction='sum') / mask.sum()  (mean over real tokens); "
          f"total = policy - {BETA} * entropy")

    impls = {"pgext": pg_error, "reference": reference.pg_error}
    rows = {}
    for name, fn in impls.items():
        policy, entropy, grad = loss_and_grad(fn, logits, actions, returns, mask)
        rows[name] = dict(policy=policy.item(), entropy=entropy.item(), grad=grad)
    truth = loss_and_grad(reference.pg_error, logits.double(), actions, returns.double(), mask.double())
    for name, fn in impls.items():
        rows[name]["saved"] = saved_for_backward(fn, logits, actions, returns, mask)
        rows[name]["peak"] = peak_growth_of(fn, logits, actions, returns, mask)
    for name, fn in impls.items():  # timings last: the memory runs above double as warm-up
        rows[name]["time"] = time_fwd_bwd(fn, logits, actions, returns, mask, args.repeats)

    mib = 2.0 ** 20
    peak_label = "peak CUDA mem +MiB" if device.type == "cuda" else "peak RSS +MiB"
    header = (f"{'impl':<10} {'policy_loss':>13} {'entropy_loss':>13} {'fwd+bwd ms':>11} "
              f"{'saved MiB':>10} {'(extra)':>8} {peak_label:>19}")
    print()
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f}"
        print(f"{name:<10} {r['policy']:>13.7f} {r['entropy']:>13.7f} {r['time'] * 1e3:>11.2f} "
              f"{r['saved']['total'] / mib:>10.1f} {r['saved']['extra'] / mib:>8.1f} {peak:>19}")
    print(f"(fwd+bwd: median of {args.repeats} runs of the loss forward and its backward to the logits; "
          "saved: distinct storages kept for backward, extra = not the inputs' own)")

    ext, ref = rows["pgext"], rows["reference"]
    grad_scale = truth[2].abs().max().item() or 1.0
    diff = dict(
        policy=abs(ext["policy"] - ref["policy"]),
        entropy=abs(ext["entropy"] - ref["entropy"]),
        grad=_max_abs(ext["grad"], ref["grad"]),
    )
    err64 = {name: dict(policy=abs(r["policy"] - truth[0].item()), entropy=abs(r["entropy"] - truth[1].item()),
                        grad=_max_abs(r["grad"], truth[2]) / grad_scale) for name, r in rows.items()}
    pad = mask == 0
    pad_zero = bool((ext["grad"][pad] == 0).all().item()) if bool(pad.any()) else True
    match = (
        diff["policy"] <= 1e-5 * (1 + abs(ref["policy"]))
        and diff["entropy"] <= 1e-5 * (1 + abs(ref["entropy"]))
        and diff["grad"] <= 1e-5 * grad_scale
        and pad_zero
    )
    print()
    print(f"pgext vs reference: |d policy| {diff['policy']:.2e}, |d entropy| {diff['entropy']:.2e}, "
          f"max |d dlogits| {diff['grad']:.2e} (largest |dlogits| {grad_scale:.2e}); "
          f"padded tokens' dlogits all 0: {'yes' if pad_zero else 'NO'} -> {'match' if match else 'MISMATCH'}")
    for name, e in err64.items():
        print(f"{name} vs float64 reference: |d policy| {e['policy']:.2e}, |d entropy| {e['entropy']:.2e}, "
              f"max |d dlogits| / largest {e['grad']:.2e}")

    # reduction='mean' is the sum over all B*T positions, padding included, divided by B*T
    with torch.no_grad():
        mean_out = pg_error(pg_data(logits, actions, returns), weight=mask, reduction="mean")
        sum_out = pg_error(pg_data(logits, actions, returns), weight=mask, reduction="sum")
    mean_vs_sum = abs(mean_out.policy_loss.item() - sum_out.policy_loss.item() / n_all)
    print(f"reduction='mean' = sum / (B*T) = {mean_out.policy_loss.item():.7f} (|d| {mean_vs_sum:.1e}): "
          f"{n_all / n_real:.2f}x smaller than the per-real-token mean used above")

    # the step itself: model forward, pgext's loss, backward through the model, Adam
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = token_loss(pg_error, model(tokens), actions, returns, mask)[2]
    optim.zero_grad()
    before.backward()
    optim.step()
    with torch.no_grad():
        after = token_loss(pg_error, model(tokens), actions, returns, mask)[2]
    print(f"one Adam step (lr 1e-2) with pgext's loss: total loss on this batch {before.item():.5f} -> {after.item():.5f}")

    speedup = ref["time"] / ext["time"] if ext["time"] > 0 else float("nan")
    print(f"pgext fwd+bwd {ext['time'] * 1e3:.2f} ms vs reference {ref['time'] * 1e3:.2f} ms "
          f"(reference/pgext = {speedup:.2f}x)")
    return dict(rows=rows, diff=diff, err64=err64, match=match, pad_grad_zero=pad_zero,
                mean_vs_sum=mean_vs_sum, loss_before=before.item(), loss_after=after.item(),
                n_real=n_real, n_all=n_all, speedup=speedup)


if __name__ == "__main__":
    sys.exit(0 if main()["match"] else 1)
