"""What the demo's algorithms share: the configuration, the result, the
policy network, the rollout of episodes and the training loop around an
algorithm's update."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

DEFAULT_TARGET = 475.0
ALGORITHMS = ("reinforce", "a2c", "ppo")


@dataclass
class Config:
    algo: str = "reinforce"  # reinforce (pg_error), a2c (a2c_error) or ppo (ppo_error)
    env: str = "CartPole-v1"
    episodes: int = 2000  # episode cap
    seed: int = 0
    device: str = "cpu"
    reference: bool = False  # train with pgext.reference's losses instead of pgext's
    progress: bool = True
    target: Optional[float] = None  # None: the env's reward_threshold (475 for CartPole-v1)
    window: int = 20  # episodes in the rolling mean that is compared with the target
    hidden: int = 64
    lr: Optional[float] = None  # Adam; None: the algorithm's default (1e-2 REINFORCE, 3e-3 A2C/PPO)
    gamma: float = 0.99
    beta: float = 0.01  # entropy bonus: total = policy_loss - beta * entropy_loss (+ value term)
    batch_episodes: int = 4  # episodes per update (1 is prone to collapsing onto one action)
    threads: Optional[int] = 1  # torch intra-op threads while training (None: leave as is)
    compare: bool = True  # also time the other implementation on every batch
    # actor-critic (a2c, ppo)
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    clip_ratio: float = 0.2  # ppo
    ppo_epochs: int = 4  # ppo: passes over each batch
    minibatch: int = 128  # ppo: steps per gradient step

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-2 if self.algo == "reinforce" else 3e-3


@dataclass
class Result:
    config: Config
    target: float
    loss_name: str  # implementation that trained the policy
    shadow_name: Optional[str]  # implementation timed alongside (None: not available)
    returns: List[float] = field(default_factory=list)  # undiscounted return per episode
    losses: List[Tuple[float, float, float]] = field(default_factory=list)  # (policy, entropy, total) per update
    solved_at: Optional[int] = None  # episode count when the rolling mean first reached the target
    wall_s: float = 0.0
    loss_s: float = 0.0  # inside the training loss (forward + backward to its inputs)
    shadow_s: float = 0.0  # the same for the shadow implementation
    updates: int = 0

    @property
    def episodes(self) -> int:
        return len(self.returns)

    @property
    def solved(self) -> bool:
        return self.solved_at is not None

    @property
    def first_losses(self) -> Tuple[float, float, float]:
        return self.losses[0]

    @property
    def final_mean(self) -> float:
        tail = self.returns[-self.config.window:]
        return float(np.mean(tail)) if tail else math.nan


@dataclass
class Batch:
    """The finished episodes of one update."""
    obs: List[np.ndarray] = field(default_factory=list)  # per step
    actions: List[int] = field(default_factory=list)  # per step
    rewards: List[List[float]] = field(default_factory=list)  # per episode, per step

    def __len__(self) -> int:
        return len(self.rewards)


def make_mlp(obs_dim: int, out: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, out),
    )


def discounted_returns(rewards: List[float], gamma: float) -> np.ndarray:
    out = np.empty(len(rewards), dtype=np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = rewards[i] + gamma * acc
        out[i] = acc
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device):
    """(step's result, seconds it took), synchronized."""
    sync(device)
    t0 = time.perf_counter()
    out = step()
    sync(device)
    return out, time.perf_counter() - t0


def run_episode(env, policy, gen, device, reset_seed):
    obs, _ = env.reset(seed=reset_seed)
    observations, actions, rewards = [], [], []
    done = False
    while not done:
        obs = np.asarray(obs, dtype=np.float32).reshape(-1)
        with torch.no_grad():
            probs = torch.softmax(policy(torch.from_numpy(obs).to(device)), -1)
        action = int(torch.multinomial(probs, 1, generator=gen).item())
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        done = terminated or truncated
    return observations, actions, rewards


def run(config: Config, make_algorithm, names: Tuple[str, Optional[str]],
        on_episode: Optional[Callable[[Result], None]] = None) -> Result:
    """Trains until the rolling mean return reaches the target or the episode
    cap. ``make_algorithm(obs_dim, n_actions, device)`` returns an object with
    ``policy`` (observations -> logits) and ``update(result, batch)``."""
    import gymnasium as gym

    device = torch.device(config.device)
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    env = gym.make(config.env)
    try:
        if not hasattr(env.action_space, "n"):
            raise ValueError(f"{config.env}: pgext's losses need a discrete action space, got {env.action_space}")
        target = config.target
        if target is None:
            spec_threshold = getattr(env.spec, "reward_threshold", None)
            target = float(spec_threshold) if spec_threshold is not None else DEFAULT_TARGET
        result = Result(config, target, *names)

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        env.action_space.seed(config.seed)
        gen = torch.Generator(device=device).manual_seed(config.seed)
        algo = make_algorithm(int(np.prod(env.observation_space.shape)), int(env.action_space.n), device)

        start = time.perf_counter()
        batch = Batch()
        while result.episodes < config.episodes and not result.solved:
            reset_seed = config.seed if result.episodes == 0 else None
            obs, act, rew = run_episode(env, algo.policy, gen, device, reset_seed)
            batch.obs += obs
            batch.actions += act
            batch.rewards.append(rew)
            result.returns.append(sum(rew))
            if result.episodes >= config.window and result.solved_at is None:
                if np.mean(result.returns[-config.window:]) >= target:
                    result.solved_at = result.episodes
            last = result.solved or result.episodes >= config.episodes
            if len(batch) == config.batch_episodes or last:
                algo.update(result, batch)
                result.updates += 1
                batch = Batch()
            result.wall_s = time.perf_counter() - start
            if on_episode is not None:
                on_episode(result)
        return result
    finally:
        env.close()
        torch.set_num_threads(old_threads)
