"""``python -m pgext.demo``: CartPole trained with pgext's losses.

    python -m pgext.demo                        # REINFORCE with pgext.pg_error (make demo)
    python -m pgext.demo --algo ppo             # PPO with pgext.ppo_error; --algo a2c: pgext.a2c_error
    python -m pgext.demo --algo reinforce,a2c,ppo --plot curves.png   # each in turn, one plot
    python -m pgext.demo --reference            # train with pgext.reference's losses instead

Modules: ``common`` (configuration, rollout, training loop), ``reinforce``,
``actor_critic`` (A2C and PPO), ``cli`` (options, summary, plot).
"""
from __future__ import annotations

from typing import Callable, Optional

from .cli import config_from_args, main, parse_args, plot_curve, plot_curves, summary
from .common import ALGORITHMS, Config, Result

__all__ = ["ALGORITHMS", "Config", "Result", "train", "plot_curve", "plot_curves", "summary", "main",
           "parse_args", "config_from_args"]


def train(config: Config, on_episode: Optional[Callable[[Result], None]] = None) -> Result:
    """Trains config.algo until the rolling mean return reaches the target or the episode cap."""
    if config.algo == "reinforce":
        from .reinforce import train as run
    elif config.algo in ("a2c", "ppo"):
        from .actor_critic import train as run
    else:
        raise ValueError(f"pgext.demo: algo must be one of {', '.join(ALGORITHMS)}, got {config.algo!r}")
    return run(config, on_episode)
