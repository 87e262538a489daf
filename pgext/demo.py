"""REINFORCE on CartPole-v1 with pgext's fused policy-gradient loss.

    python -m pgext.demo                 # train with pgext.pg_error until solved
    python -m pgext.demo --reference     # train with the pure-PyTorch reference instead
    python -m pgext.demo --help

The policy is a small MLP trained with Adam on ``policy_loss - beta *
entropy_loss`` (discounted returns, normalised per batch of episodes). Training
stops when the mean return of the last 20 episodes reaches the environment's
reward threshold (475 for CartPole-v1) or at the episode cap. Every batch's
loss is also computed by the other implementation (without using its
gradients), so one run reports the time spent in both. Needs gymnasium, tqdm
and matplotlib (``pip install -r requirements/demo.txt``).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from ._demo_train import Config, Result, train

__all__ = ["Config", "Result", "train", "plot_curve", "summary", "main"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m pgext.demo",
        description="REINFORCE with pgext.pg_error (loss + entropy bonus in one fused op).",
    )
    p.add_argument("--env", default=d.env, help="gymnasium environment with discrete actions (default %(default)s)")
    p.add_argument("--episodes", type=int, default=d.episodes, help="episode cap (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of torch, numpy, the env and sampling (default %(default)s)")
    p.add_argument("--plot", default="demo_curve.png", metavar="PATH",
                   help="learning-curve PNG (default %(default)s; '' to skip)")
    p.add_argument("--device", default=d.device, help="cpu (default) or cuda")
    p.add_argument("--reference", action="store_true",
                   help="train with pgext.reference.pg_error (pure PyTorch) instead of pgext's op")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--target", type=float, default=None,
                   help="mean return to stop at (default: the env's reward threshold, 475 for CartPole-v1)")
    g = p.add_argument_group("hyper-parameters")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    g.add_argument("--beta", type=float, default=d.beta, help="entropy bonus weight (default %(default)s)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="discount (default %(default)s)")
    g.add_argument("--hidden", type=int, default=d.hidden, help="MLP width (default %(default)s)")
    g.add_argument("--batch-episodes", type=int, default=d.batch_episodes,
                   help="episodes per update (default %(default)s)")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.batch_episodes < 1 or args.hidden < 1:
        p.error("--episodes, --batch-episodes and --hidden must be positive")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available on this machine")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        env=args.env, episodes=args.episodes, seed=args.seed, device=args.device,
        reference=args.reference, progress=not args.no_progress, target=args.target,
        lr=args.lr, beta=args.beta, gamma=args.gamma, hidden=args.hidden,
        batch_episodes=args.batch_episodes,
    )


def plot_curve(result: Result, path: str) -> None:
    """Episode returns, their rolling mean and the target line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    returns = np.asarray(result.returns, dtype=float)
    episodes = np.arange(1, len(returns) + 1)
    w = result.config.window
    rolling = np.array([returns[max(0, i + 1 - w): i + 1].mean() for i in range(len(returns))])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(episodes, returns, color="tab:blue", alpha=0.35, lw=1, label="episode return")
    ax.plot(episodes, rolling, color="tab:blue", lw=2, label=f"mean of last {w}")
    ax.axhline(result.target, color="tab:red", ls="--", lw=1, label=f"target {result.target:g}")
    if result.solved:
        ax.axvline(result.solved_at, color="tab:green", ls=":", lw=1, label=f"solved at {result.solved_at}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.set_title(f"REINFORCE on {result.config.env} with {result.loss_name} pg_error (seed {result.config.seed})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(result: Result) -> str:
    status = (f"solved in {result.episodes} episodes" if result.solved
              else f"not solved after {result.episodes} episodes (cap {result.config.episodes})")
    line = (f"{result.config.env}: {status}, {result.wall_s:.1f} s, "
            f"final mean return (last {result.config.window}) {result.final_mean:.1f}; "
            f"loss fwd+bwd over {result.updates} batches: {result.loss_name} {result.loss_s * 1e3:.1f} ms")
    if result.shadow_name is None:
        return line + " (pgext not importable: no comparison)"
    line += f" vs {result.shadow_name} {result.shadow_s * 1e3:.1f} ms"
    ext_s, ref_s = ((result.loss_s, result.shadow_s) if result.loss_name == "pgext"
                    else (result.shadow_s, result.loss_s))
    if ext_s > 0 and math.isfinite(ref_s / ext_s):
        line += f" (reference/pgext = {ref_s / ext_s:.2f}x)"
    return line


def _progress(config: Config):
    """(callback per episode, close) for a tqdm bar; no-ops when disabled.

    The bar is created at the first finished episode, so that its rate is not
    skewed by the imports and the environment's creation.
    """
    if not config.progress:
        return None, lambda: None
    from tqdm import tqdm

    bars = []
    w = config.window

    def on_episode(result: Result) -> None:
        if not bars:
            bars.append(tqdm(total=config.episodes, unit="ep", dynamic_ncols=True, leave=True))
        bar = bars[0]
        tail = result.returns[-w:]
        bar.set_postfix_str(f"episode {result.episodes} | return {result.returns[-1]:.0f} | "
                            f"mean{w} {sum(tail) / len(tail):.1f}", refresh=False)
        bar.update(result.episodes - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return on_episode, close


def main(argv: Optional[List[str]] = None) -> Result:
    args = parse_args(argv)
    config = config_from_args(args)
    impl = "pgext.reference.pg_error" if config.reference else "pgext.pg_error"
    target = f"{config.target:g}" if config.target is not None else "the env's reward threshold (475 for CartPole-v1)"
    print(f"REINFORCE on {config.env} with {impl} | seed {config.seed} | {config.device} | "
          f"stops at mean return >= {target} over the last {config.window} episodes, "
          f"or after {config.episodes} episodes", flush=True)
    on_episode, close = _progress(config)
    try:
        result = train(config, on_episode)
    finally:
        close()
    print(summary(result), flush=True)
    if args.plot:
        plot_curve(result, args.plot)
        print(f"learning curve: {args.plot}", flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
