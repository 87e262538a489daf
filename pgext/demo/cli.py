"""The command line of ``python -m pgext.demo``: options, summary, learning curves.

The policy is a small MLP trained with Adam: REINFORCE on ``policy_loss - beta
* entropy_loss`` from ``pg_error`` (discounted returns, normalised per batch
of episodes), or A2C / PPO with a critic MLP and ``a2c_error`` / ``ppo_error``
(``--algo``). Training stops when the mean return of the last 20 episodes
reaches the environment's reward threshold (475 for CartPole-v1) or at the
episode cap. Every loss call is also made with the other implementation
(without using its gradients), so one run reports the time spent in both.
Needs gymnasium, tqdm and matplotlib (``pip install -r requirements/demo.txt``).
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional

from .common import ALGORITHMS, Config, Result

TITLES = {"reinforce": "REINFORCE (pg_error)", "a2c": "A2C (a2c_error)", "ppo": "PPO (ppo_error)"}
COLORS = {"reinforce": "tab:blue", "a2c": "tab:orange", "ppo": "tab:green"}


def _algorithms(text: str) -> List[str]:
    algos = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGORITHMS]
    if not algos or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(ALGORITHMS)}, got {text!r}")
    return algos


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m pgext.demo",
        description="CartPole trained with pgext's losses: REINFORCE (pg_error), A2C (a2c_error) or PPO (ppo_error).",
    )
    p.add_argument("--algo", type=_algorithms, default=[d.algo], metavar="ALGO[,ALGO...]",
                   help=f"{', '.join(ALGORITHMS)}, or several in turn (default {d.algo})")
    p.add_argument("--env", default=d.env, help="gymnasium environment with discrete actions (default %(default)s)")
    p.add_argument("--episodes", type=int, default=d.episodes, help="episode cap (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of torch, numpy, the env and sampling (default %(default)s)")
    p.add_argument("--plot", default="demo_curve.png", metavar="PATH",
                   help="learning-curve PNG (default %(default)s; '' to skip)")
    p.add_argument("--device", default=d.device, help="cpu (default) or cuda")
    p.add_argument("--reference", action="store_true",
                   help="train with pgext.reference's losses (pure PyTorch) instead of pgext's ops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--target", type=float, default=None,
                   help="mean return to stop at (default: the env's reward threshold, 475 for CartPole-v1)")
    g = p.add_argument_group("hyper-parameters")
    g.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 1e-2 for REINFORCE, 3e-3 for A2C and PPO)")
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


def config_from_args(args: argparse.Namespace, algo: Optional[str] = None) -> Config:
    return Config(
        algo=algo or args.algo[0], env=args.env, episodes=args.episodes, seed=args.seed, device=args.device,
        reference=args.reference, progress=not args.no_progress, target=args.target,
        lr=args.lr, beta=args.beta, gamma=args.gamma, hidden=args.hidden,
        batch_episodes=args.batch_episodes,
    )


def _rolling(returns, w: int):
    import numpy as np

    return np.array([returns[max(0, i + 1 - w): i + 1].mean() for i in range(len(returns))])


def plot_curves(results: List[Result], path: str) -> None:
    """Episode returns and their rolling mean of one or several runs, the
    target line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    w = results[0].config.window
    for result in results:
        algo = result.config.algo
        returns = np.asarray(result.returns, dtype=float)
        episodes = np.arange(1, len(returns) + 1)
        color = COLORS.get(algo, "tab:gray")
        ax.plot(episodes, returns, color=color, alpha=0.25, lw=1)
        solved = f", solved at {result.solved_at}" if result.solved else ""
        ax.plot(episodes, _rolling(returns, w), color=color, lw=2,
                label=f"{TITLES.get(algo, algo)}: mean of last {w}{solved}")
    ax.axhline(results[0].target, color="tab:red", ls="--", lw=1, label=f"target {results[0].target:g}")
    ax.set_xlabel("episode")
    ax.set_ylabel("return (faint: each episode)")
    impl = results[0].loss_name
    ax.set_title(f"{results[0].config.env} with {impl}'s losses (seed {results[0].config.seed})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curve(result: Result, path: str) -> None:
    """One run's learning curve (plot_curves of one result)."""
    plot_curves([result], path)


def summary(result: Result) -> str:
    status = (f"solved in {result.episodes} episodes" if result.solved
              else f"not solved after {result.episodes} episodes (cap {result.config.episodes})")
    line = (f"{result.config.env} {TITLES.get(result.config.algo, result.config.algo)}: {status}, {result.wall_s:.1f} s, "
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


def main(argv: Optional[List[str]] = None):
    """Trains each algorithm of --algo in turn; returns its Result (a list of
    them for several)."""
    from . import train

    args = parse_args(argv)
    results = []
    for algo in args.algo:
        config = config_from_args(args, algo)
        impl = f"pgext.reference's {algo} loss" if config.reference else f"pgext's {algo} loss"
        target = (f"{config.target:g}" if config.target is not None
                  else "the env's reward threshold (475 for CartPole-v1)")
        print(f"{TITLES[algo]} on {config.env} with {impl} | seed {config.seed} | {config.device} | "
              f"stops at mean return >= {target} over the last {config.window} episodes, "
              f"or after {config.episodes} episodes", flush=True)
        on_episode, close = _progress(config)
        try:
            results.append(train(config, on_episode))
        finally:
            close()
        print(summary(results[-1]), flush=True)
    if args.plot:
        plot_curves(results, args.plot)
        print(f"learning curve: {args.plot}", flush=True)
    return results[0] if len(results) == 1 else results
