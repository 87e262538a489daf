"""Token-level PPO/GRPO step for a toy language model: pgext against the TRL-style composition.

    python examples/token_level_ppo.py                       # vocab 32000, 4 x 256 tokens, bfloat16, cpu
    python examples/token_level_ppo.py --vocab 151936 --batch 8 --seq 512
    python examples/token_level_ppo.py --fused-head --vocab 151936 --batch 8 --seq 512

Each emitted token is an action of a categorical policy over the vocabulary.
A GRPO-style step: sequences come in groups sampled from one prompt, each
sequence's reward is normalized within its group into an advantage shared by
its tokens, and the loss per real token is PPO's clipped surrogate on the
ratio exp(log_prob - old_log_prob), minus an entropy bonus; padding tokens
carry the action -100 (``ignore_index``). The logits are bfloat16 ``(B, T, V)``;
the policy is that of the logits divided by the sampling temperature.

Two ways to get the per-token log-probabilities and entropies:

* pgext: ``pgext.log_prob_entropy(logits, actions, temperature=T,
  ignore_index=-100)``, one fused pass over the logits forward and one
  backward (the temperature applied as the kernels read each logit), 12 bytes
  per token saved;
* the TRL-style composition: ``selective_log_softmax`` as a row-wise
  logsumexp plus a gather, and ``entropy_from_logits`` (a chunked
  ``log_softmax``), in float32 as those helpers compute for bfloat16 logits,
  each dividing its float32 chunk by the temperature.

The script checks that both give the same loss and gradient (and both against
float64), then reports the median time of forward + backward of the loss to
the logits and the peak memory growth during it.

With ``--fused-head`` the inputs are the LM's last hidden states ``(B, T, H)``
and its output layer's weight ``(V, H)`` (bfloat16, no bias unless ``--bias``)
instead of the logits, and the same loss is computed two ways:

* fused: ``pgext.linear_log_prob_entropy(hidden, weight, actions,
  linear_bias=bias, temperature=T, ignore_index=-100)``, the ``(B, T, V)``
  logits formed a class slice at a time and never in full, forward or backward;
* unfused: ``F.linear(hidden, weight, bias)``, then ``pgext.log_prob_entropy``.

It checks that their log-probabilities, entropies, losses and gradients to the
hidden states and the weight (and bias) agree, then reports time and peak
memory as above, for the gradients to the hidden states and the weight.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

try:
    import pgext
except ImportError:  # running from a checkout without installing: the package is next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pgext

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _measure, next to this script
from _measure import malloc_returns_big_blocks, median_seconds, peak_growth  # noqa: E402

CLIP = 0.2
BETA = 0.01      # entropy bonus
IGNORE = -100    # the action of a padding token


def make_batch(vocab: int, batch: int, seq: int, group: int, seed: int):
    """Actions (padding -100), per-sequence advantages normalized within groups
    of ``group`` sequences, and the 0/1 mask of real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    actions = torch.randint(0, vocab, (batch, seq), generator=g).masked_fill(~mask, IGNORE)
    reward = torch.randn(batch, generator=g).view(-1, group)
    adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)).view(batch, 1)
    return actions, adv, mask


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL-style: the chosen token's logit minus a row-wise logsumexp (one sequence at a time),
    of the logits divided by the temperature in float32."""
    selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float() / temperature
    lse = torch.stack([torch.logsumexp(row.float() / temperature, dim=-1) for row in logits])
    return selected - lse


def entropy_from_logits(logits: torch.Tensor, temperature: float, chunk: int = 128) -> torch.Tensor:
    """TRL-style: entropy of each row through log_softmax, in chunks of rows."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for rows in flat.split(chunk):
        logp = F.log_softmax(rows.float() / temperature, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).view(logits.shape[:-1])


def per_token_pgext(logits, actions, temperature):
    return pgext.log_prob_entropy(logits, actions, temperature=temperature, ignore_index=IGNORE)


def per_token_composition(logits, actions, temperature):
    return (selective_log_softmax(logits, actions.clamp(min=0), temperature),
            entropy_from_logits(logits, temperature))


def grpo_loss(per_token, logits, actions, old_log_prob, adv, mask):
    """PPO's clipped surrogate per token and an entropy bonus, averaged over the real tokens."""
    log_prob, entropy = per_token(logits, actions)
    return grpo_loss_on(log_prob, entropy, old_log_prob, adv, mask)


def grpo_loss_on(log_prob, entropy, old_log_prob, adv, mask):
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
    m = mask.to(surrogate.dtype)
    n = m.sum()
    return -(surrogate * m).sum() / n - BETA * (entropy * m).sum() / n


def loss_and_grad(per_token, logits, actions, old_log_prob, adv, mask):
    z = logits.detach().requires_grad_(True)
    loss = grpo_loss(per_token, z, actions, old_log_prob, adv, mask)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def per_token_fused(hidden, weight, bias, actions, temperature):
    return pgext.linear_log_prob_entropy(hidden, weight, actions, linear_bias=bias, temperature=temperature,
                                         ignore_index=IGNORE)


def per_token_unfused(hidden, weight, bias, actions, temperature):
    return pgext.log_prob_entropy(F.linear(hidden, weight, bias), actions, temperature=temperature,
                                  ignore_index=IGNORE)


def per_token_head_float64(hidden, weight, bias, actions, temperature):
    return pgext.reference.log_prob_entropy(F.linear(hidden, weight, bias), actions, temperature=temperature,
                                            ignore_index=IGNORE)


def head_loss_and_grads(per_token, head, actions, old_log_prob, adv, mask):
    """The loss on the output layer ``head = (hidden, weight, bias or None)``: loss, log_prob,
    entropy and the gradients to the head's tensors (bias's only where there is one)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in head]
    log_prob, entropy = per_token(*leaves, actions)
    loss = grpo_loss_on(log_prob, entropy, old_log_prob, adv, mask)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return dict(loss=loss.detach(), log_prob=log_prob.detach(), entropy=entropy.detach(), grads=grads)


def clipped(log_prob, old_log_prob, adv):
    """The tokens whose surrogate is the clipped, constant one (no gradient to log_prob)."""
    ratio = torch.exp(log_prob - old_log_prob)
    bound = ratio.clamp(1 - CLIP, 1 + CLIP)
    return (bound != ratio) & (bound * adv < ratio * adv)


def loss_upstream(log_prob, entropy, old_log_prob, adv, mask):
    """d loss / d log_prob and d loss / d entropy."""
    lp, ent = (t.detach().requires_grad_(True) for t in (log_prob, entropy))
    return torch.autograd.grad(grpo_loss_on(lp, ent, old_log_prob, adv, mask), (lp, ent))


def head_grads(per_token, head, actions, upstream):
    """The head's gradients for the given upstream gradients of (log_prob, entropy)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in head]
    return torch.autograd.grad(per_token(*leaves, actions), [t for t in leaves if t is not None], upstream)


def main_fused_head(args: argparse.Namespace, device: torch.device) -> dict:
    actions, adv, mask = (t.to(device) for t in make_batch(args.vocab, args.batch, args.seq, args.group, args.seed))
    g = torch.Generator().manual_seed(args.seed + 1)
    H = args.hidden
    hidden = torch.randn(args.batch, args.seq, H, generator=g).to(device, torch.bfloat16)
    # logits of standard deviation 2, as the default mode draws them
    weight = (torch.randn(args.vocab, H, generator=g) * (2 / H ** 0.5)).to(device, torch.bfloat16)
    bias = (torch.randn(args.vocab, generator=g) * 0.5).to(device, torch.bfloat16) if args.bias else None
    head = (hidden, weight, bias)
    with torch.no_grad():  # the policy that sampled: a little away from the current one
        drift = (torch.randn(hidden.shape, generator=g) * 0.1).to(device, torch.bfloat16)
        old_log_prob = per_token_fused(hidden + drift, weight, bias, actions, args.temperature)[0]
        del drift
    n_real = int(mask.sum())
    mib = 2.0 ** 20
    logits_bytes = args.batch * args.seq * args.vocab * hidden.element_size()
    grad_bytes = sum(t.numel() * t.element_size() for t in head if t is not None)
    print(f"token-level GRPO step, output layer fused: vocab {args.vocab}, {args.batch} x {args.seq} tokens "
          f"({n_real} real), hidden {H}{' + bias' if args.bias else ''}, groups of {args.group}, temperature "
          f"{args.temperature}, {device}, {hidden.dtype}; hidden {hidden.numel() * hidden.element_size() / mib:.1f} "
          f"MiB, weight {weight.numel() * weight.element_size() / mib:.1f} MiB, the logits would be "
          f"{logits_bytes / mib:.1f} MiB")

    impls = {name: functools.partial(fn, temperature=args.temperature)
             for name, fn in (("fused", per_token_fused), ("unfused", per_token_unfused))}
    steps = {name: (lambda f=fn: head_loss_and_grads(f, head, actions, old_log_prob, adv, mask))
             for name, fn in impls.items()}
    # The peaks first, the fused path's before the unfused path has ever run: the unfused step leaves
    # memory behind (128 MiB at 512 x 151936 on the CPU) that the next step releases, which would hide
    # that much of the fused step's growth.
    peaks = {name: peak_growth(step, device) for name, step in steps.items()}
    rows = {name: step() for name, step in steps.items()}
    truth = head_loss_and_grads(functools.partial(per_token_head_float64, temperature=args.temperature),
                                [None if t is None else t.double() for t in head],
                                actions, old_log_prob, adv, mask) \
        if args.batch * args.seq * args.vocab <= 2**26 else None
    for name, step in steps.items():
        rows[name]["peak"] = peaks[name]
        rows[name]["time"] = median_seconds(step, device, args.repeats)

    names = ["hidden", "weight", "bias"][:len(rows["fused"]["grads"])]
    label = "peak CUDA mem +MiB" if device.type == "cuda" else "peak RSS +MiB"
    header = (f"{'impl':<8} {'loss':>12} {'fwd+bwd ms':>11} {label:>19} {'beyond grads':>13} {'|loss - f64|':>13} "
              f"{'|dhidden - f64|':>16} {'|dweight - f64|':>16}")
    print()
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        errors = ["n/a"] * 3
        if truth is not None:
            errors = [f"{abs(r['loss'].item() - truth['loss'].item()):.2e}"] + \
                [f"{(a.double() - b).abs().max().item():.2e}" for a, b in zip(r["grads"][:2], truth["grads"][:2])]
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f}"
        # what the loss itself needs: the peak less the gradients of hidden, weight and bias
        beyond = "n/a" if r["peak"] is None else f"{(r['peak'] - grad_bytes) / mib:.1f}"
        print(f"{name:<8} {r['loss'].item():>12.7f} {r['time'] * 1e3:>11.1f} {peak:>19} {beyond:>13} "
              f"{errors[0]:>13} {errors[1]:>16} {errors[2]:>16}")
    fused, unfused = rows["fused"], rows["unfused"]
    real = mask
    diff = {k: (fused[k] - unfused[k])[real].abs().max().item() if n_real else 0.0 for k in ("log_prob", "entropy")}
    diff["loss"] = abs(fused["loss"].item() - unfused["loss"].item())
    # The two sides' logits are not the same bfloat16 numbers (the fused op rounds them after
    # dividing by the temperature, in slice-sized GEMMs): log_prob differs by about one rounding of
    # the largest logit, and a token whose ratio sits that close to 1 +- CLIP is clipped on one side
    # only, its whole surrogate gradient there and none on the other. So the op's gradients are
    # compared under the same upstream gradients (the unfused side's d loss / d log_prob, d entropy),
    # and the loss's own only on the tokens both sides clip alike.
    flat_f, flat_u = (clipped(r["log_prob"], old_log_prob, adv) for r in (fused, unfused))
    clipped_apart = (flat_f != flat_u) & real
    n_apart = int(clipped_apart.sum())
    upstream = loss_upstream(unfused["log_prob"], unfused["entropy"], old_log_prob, adv, mask)
    same_up = {name: head_grads(fn, head, actions, upstream) for name, fn in impls.items()}

    def grad_gap(a, b):
        return (a.double() - b.double()).abs().max().item(), b.abs().max().item() or 1.0

    op_gap = {n: grad_gap(a, b) for n, a, b in zip(names, same_up["fused"], same_up["unfused"])}
    alike = (~clipped_apart)[..., None]
    loss_gap = {"hidden": grad_gap(fused["grads"][0] * alike, unfused["grads"][0] * alike)}
    loss_gap.update({n: grad_gap(a, b) for n, a, b in zip(names[1:], fused["grads"][1:], unfused["grads"][1:])})
    z_max = (torch.stack([fused["log_prob"][real].abs().max(), fused["entropy"][real].max()]).max().item()
             if n_real else 0.0) + 1.0
    # tolerances: a few bfloat16 roundings (2^-9 relative) of the log-probabilities' scale or of the
    # largest gradient
    agree = diff["log_prob"] <= 2 ** -6 * z_max and diff["entropy"] <= 2 ** -6 * z_max and \
        diff["loss"] <= 2 ** -6 * (1 + abs(unfused["loss"].item())) and \
        all(d <= 2 ** -6 * scale for d, scale in op_gap.values()) and \
        loss_gap["hidden"][0] <= 2 ** -4 * loss_gap["hidden"][1] and \
        (n_apart > 0 or all(d <= 2 ** -4 * scale for d, scale in loss_gap.values()))
    padded_zero = all(bool((r["grads"][0][~mask] == 0).all()) for r in rows.values())
    print(f"(median of {args.repeats} runs of the loss forward and its backward to the hidden states and the "
          "weight; peak: memory growth during one, MiB; beyond grads: less the gradients of hidden"
          f"{', weight and bias' if args.bias else ' and weight'}; f64: the same loss with the layer and the loss in "
          "float64, where the logits fit in memory)")

    def gaps(g):
        return ", ".join(f"{n} {d:.2e} (largest {s:.2e})" for n, (d, s) in g.items())

    print("max |fused - unfused| over real tokens: "
          f"log_prob {diff['log_prob']:.2e}, entropy {diff['entropy']:.2e}, loss {diff['loss']:.2e}")
    print(f"  gradients for the same upstream gradients: {gaps(op_gap)}")
    print(f"  the loss's gradients: {gaps(loss_gap)}; tokens clipped on one side only: {n_apart} of {n_real}"
          + (" (their hidden rows left out)" if n_apart else ""))
    print(f"unfused / fused time: {unfused['time'] / fused['time']:.2f}x"
          + ("" if fused["peak"] is None or unfused["peak"] is None or unfused["peak"] < mib else
             f", fused / unfused peak: {fused['peak'] / unfused['peak']:.3f}")
          + f"; padded tokens' hidden gradients all 0: {'yes' if padded_zero else 'NO'}; "
          f"fused and unfused agree: {'yes' if agree else 'NO'}")
    return dict(rows=rows, agree=agree, padded_zero=padded_zero, diff=diff, op_gap=op_gap, loss_gap=loss_gap,
                clipped_apart=n_apart)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences B, a multiple of --group (default %(default)s)")
    p.add_argument("--group", type=int, default=2, help="sequences per prompt (default %(default)s)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence T (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused-head", action="store_true",
                   help="start from hidden states and the output layer's weight: pgext.linear_log_prob_entropy "
                        "against F.linear then pgext.log_prob_entropy")
    p.add_argument("--hidden", type=int, default=896,
                   help="hidden size H with --fused-head (default %(default)s, Qwen2.5-0.5B's)")
    p.add_argument("--bias", action="store_true", help="with --fused-head: the output layer has a bias")
    args = p.parse_args(argv)
    if min(args.vocab, args.batch, args.seq, args.repeats, args.group, args.hidden) < 1 or args.temperature <= 0:
        p.error("--vocab, --batch, --group, --seq, --repeats, --hidden and --temperature must be positive")
    if args.batch % args.group:
        p.error("--batch must be a multiple of --group")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        malloc_returns_big_blocks()
    if args.fused_head:
        return main_fused_head(args, device)
    actions, adv, mask = (t.to(device) for t in make_batch(args.vocab, args.batch, args.seq, args.group, args.seed))
    g = torch.Generator().manual_seed(args.seed + 1)
    logits = (torch.randn(args.batch, args.seq, args.vocab, generator=g) * 2).to(device, torch.bfloat16)
    with torch.no_grad():  # the policy that sampled: a little away from the current one
        drift = (torch.randn(logits.shape, generator=g) * 0.2).to(device, torch.bfloat16)
        old_log_prob = pgext.log_prob_entropy(
            logits + drift, actions, temperature=args.temperature, ignore_index=IGNORE)[0]
        del drift
    n_real = int(mask.sum())
    print(f"token-level GRPO step: vocab {args.vocab}, {args.batch} x {args.seq} tokens ({n_real} real), "
          f"groups of {args.group}, temperature {args.temperature}, {device}, logits {logits.dtype} = "
          f"{logits.numel() * logits.element_size() / 2**20:.1f} MiB")

    impls = {name: functools.partial(fn, temperature=args.temperature)
             for name, fn in (("pgext", per_token_pgext), ("composition", per_token_composition))}
    rows = {name: dict(zip(("loss", "grad"), loss_and_grad(fn, logits, actions, old_log_prob, adv, mask)))
            for name, fn in impls.items()}
    # the float64 truth (Categorical, several float64 logit-sized tensors) where it fits in memory
    truth = loss_and_grad(functools.partial(per_token_float64, temperature=args.temperature), logits.double(),
                          actions, old_log_prob, adv, mask) \
        if logits.numel() <= 2**26 else None
    for name, fn in impls.items():
        step = (lambda f=fn: loss_and_grad(f, logits, actions, old_log_prob, adv, mask))
        rows[name]["peak"] = peak_growth(step, device)
        rows[name]["time"] = median_seconds(step, device, args.repeats)

    mib = 2.0 ** 20
    grad_bytes = logits.numel() * logits.element_size()
    label = "peak CUDA mem +MiB" if device.type == "cuda" else "peak RSS +MiB"
    header = (f"{'impl':<12} {'loss':>12} {'fwd+bwd ms':>11} {label:>19} {'beyond grad':>12} {'|loss - f64|':>13} "
              f"{'|grad - f64|':>13}")
    print()
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        errors = ["n/a", "n/a"]
        if truth is not None:
            errors = [f"{abs(r['loss'].item() - truth[0].item()):.2e}",
                      f"{(r['grad'].double() - truth[1]).abs().max().item():.2e}"]
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f}"
        # what the loss itself needs: the peak less the logits' gradient (bfloat16, logit-sized)
        beyond = "n/a" if r["peak"] is None else f"{(r['peak'] - grad_bytes) / mib:.1f}"
        print(f"{name:<12} {r['loss'].item():>12.7f} {r['time'] * 1e3:>11.1f} {peak:>19} {beyond:>12} "
              f"{errors[0]:>13} {errors[1]:>13}")
    ext, comp = rows["pgext"], rows["composition"]
    speedup = comp["time"] / ext["time"]
    grad_scale = comp["grad"].abs().max().item() or 1.0
    # the gradients are bfloat16: the two sides within a few of its roundings of each other
    agree = abs(ext["loss"].item() - comp["loss"].item()) <= 1e-4 * (1 + abs(comp["loss"].item())) and \
        (ext["grad"].double() - comp["grad"].double()).abs().max().item() <= 2 ** -6 * grad_scale
    padded_zero = bool((ext["grad"][~mask] == 0).all())
    print(f"(median of {args.repeats} runs of the loss forward and its backward to the logits; peak: memory "
          "growth during one, MiB; beyond grad: less the logits' gradient; f64: the same loss on the logits in "
          "float64, where they fit in memory)")
    print(f"composition / pgext time: {speedup:.2f}x; padded tokens' gradients all 0: {'yes' if padded_zero else 'NO'}; "
          f"pgext and the composition agree: {'yes' if agree else 'NO'}")
    return dict(rows=rows, speedup=speedup, agree=agree, padded_zero=padded_zero)


def per_token_float64(logits, actions, temperature):
    """The truth: Categorical on float64 logits (pgext.reference)."""
    return pgext.reference.log_prob_entropy(logits, actions, temperature=temperature, ignore_index=IGNORE)


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["agree"] and result["padded_zero"] else 1)
