"""REINFORCE training loop of ``python -m pgext.demo`` (importable by tests).

One update per ``batch_episodes`` finished episodes:

* actions are sampled step by step without autograd (a seeded
  ``torch.Generator``), then the whole batch of observations goes through the
  policy once more to get the logits the loss needs;
* the loss is ``policy_loss - beta * entropy_loss`` from ``pg_error`` on
  discounted returns normalised over the batch;
* the loss op is timed on a detached copy of the logits (forward and
  ``autograd.grad`` to the logits), so the measured time is the loss op's own
  and not the MLP's; the gradient is then pushed through the MLP untimed.
  The other implementation (the reference, or pgext with ``--reference``) is
  timed the same way on the same batch, its gradient thrown away.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

DEFAULT_TARGET = 475.0


@dataclass
class Config:
    env: str = "CartPole-v1"
    episodes: int = 2000  # episode cap
    seed: int = 0
    device: str = "cpu"
    reference: bool = False  # train with pgext.reference.pg_error instead of pgext's op
    progress: bool = True
    target: Optional[float] = None  # None: the env's reward_threshold (475 for CartPole-v1)
    window: int = 20  # episodes in the rolling mean that is compared with the target
    hidden: int = 64
    lr: float = 1e-2  # Adam
    gamma: float = 0.99
    beta: float = 0.01  # entropy bonus: total = policy_loss - beta * entropy_loss
    batch_episodes: int = 4  # episodes per update (1 is prone to collapsing onto one action)
    threads: Optional[int] = 1  # torch intra-op threads while training (None: leave as is)
    compare: bool = True  # also time the other implementation on every batch


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
    loss_s: float = 0.0  # inside the training loss (forward + backward to the logits)
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


def loss_functions(use_reference: bool, need_shadow: bool):
    """((name, pg_error, pg_data), shadow or None) for training and for the timing comparison."""
    try:
        # the reference too: importing any part of pgext loads its compiled op
        from pgext import pg_data, pg_error
        from pgext import reference as ref
    except ImportError as exc:
        raise ImportError(
            "pgext's compiled op is not importable: build it first (`make build`, or "
            "`python setup.py build_ext --inplace`)"
        ) from exc
    ref_impl = ("reference", ref.pg_error, ref.pg_data)
    ext_impl = ("pgext", pg_error, pg_data)
    train, shadow = (ref_impl, ext_impl) if use_reference else (ext_impl, ref_impl)
    return train, (shadow if need_shadow else None)


def make_policy(obs_dim: int, n_actions: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, n_actions),
    )


def discounted_returns(rewards: List[float], gamma: float) -> np.ndarray:
    out = np.empty(len(rewards), dtype=np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = rewards[i] + gamma * acc
        out[i] = acc
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loss(impl, logits: torch.Tensor, actions, returns, beta: float, device):
    """Loss values and d(total)/d(logits), with the seconds the loss op took (forward + backward)."""
    _, pg_error, pg_data = impl
    z = logits.detach().requires_grad_(True)
    _sync(device)
    t0 = time.perf_counter()
    out = pg_error(pg_data(z, actions, returns))
    total = out.policy_loss - beta * out.entropy_loss
    (grad,) = torch.autograd.grad(total, z)
    _sync(device)
    dt = time.perf_counter() - t0
    return (out.policy_loss.item(), out.entropy_loss.item(), total.item()), grad, dt


def _run_episode(env, policy, gen, device, reset_seed):
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


def train(config: Config, on_episode: Optional[Callable[[Result], None]] = None) -> Result:
    """Trains until the rolling mean return reaches the target or the episode cap."""
    import gymnasium as gym

    device = torch.device(config.device)
    train_impl, shadow_impl = loss_functions(config.reference, config.compare)
    old_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    env = gym.make(config.env)
    try:
        if not hasattr(env.action_space, "n"):
            raise ValueError(f"{config.env}: pg_error needs a discrete action space, got {env.action_space}")
        target = config.target
        if target is None:
            spec_threshold = getattr(env.spec, "reward_threshold", None)
            target = float(spec_threshold) if spec_threshold is not None else DEFAULT_TARGET
        result = Result(config, target, train_impl[0], shadow_impl[0] if shadow_impl else None)

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        env.action_space.seed(config.seed)
        gen = torch.Generator(device=device).manual_seed(config.seed)
        obs_dim = int(np.prod(env.observation_space.shape))
        policy = make_policy(obs_dim, int(env.action_space.n), config.hidden).to(device)
        optim = torch.optim.Adam(policy.parameters(), lr=config.lr)

        start = time.perf_counter()
        batch_obs, batch_act, batch_ret = [], [], []
        n_batch = 0
        while result.episodes < config.episodes and not result.solved:
            reset_seed = config.seed if result.episodes == 0 else None
            obs, act, rew = _run_episode(env, policy, gen, device, reset_seed)
            batch_obs += obs
            batch_act += act
            batch_ret.append(discounted_returns(rew, config.gamma))
            n_batch += 1
            result.returns.append(sum(rew))
            if result.episodes >= config.window and result.solved_at is None:
                if np.mean(result.returns[-config.window:]) >= target:
                    result.solved_at = result.episodes
            last = result.solved or result.episodes >= config.episodes
            if n_batch == config.batch_episodes or last:
                _update(policy, optim, train_impl, shadow_impl, result,
                        batch_obs, batch_act, np.concatenate(batch_ret), config, device)
                batch_obs, batch_act, batch_ret = [], [], []
                n_batch = 0
            result.wall_s = time.perf_counter() - start
            if on_episode is not None:
                on_episode(result)
        return result
    finally:
        env.close()
        torch.set_num_threads(old_threads)


def _update(policy, optim, train_impl, shadow_impl, result, obs, act, ret, config, device):
    ret = (ret - ret.mean()) / (ret.std() + 1e-8)
    obs_t = torch.from_numpy(np.stack(obs)).to(device)
    act_t = torch.tensor(act, dtype=torch.int64, device=device)
    ret_t = torch.from_numpy(ret.astype(np.float32)).to(device)
    logits = policy(obs_t)
    # alternate which implementation runs first, so neither always gets warm caches
    shadow_first = shadow_impl is not None and result.updates % 2 == 1
    if shadow_first:
        result.shadow_s += _timed_loss(shadow_impl, logits, act_t, ret_t, config.beta, device)[2]
    values, grad, dt = _timed_loss(train_impl, logits, act_t, ret_t, config.beta, device)
    result.loss_s += dt
    if shadow_impl is not None and not shadow_first:
        result.shadow_s += _timed_loss(shadow_impl, logits, act_t, ret_t, config.beta, device)[2]
    optim.zero_grad(set_to_none=True)
    logits.backward(grad)
    optim.step()
    result.losses.append(values)
    result.updates += 1
