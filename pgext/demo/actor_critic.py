"""A2C and PPO with pgext's DI-engine-style losses (``a2c_error``, ``ppo_error``).

A policy MLP (logits) and a critic MLP (state value), trained with Adam on
``policy_loss + value_coef * value_loss - beta * entropy_loss``. Advantages
are GAE(lambda) over each finished episode with the critic's values,
normalised over the batch; the value target is advantage + value. A2C takes
one gradient step per batch; PPO takes ``ppo_epochs`` passes over the batch in
shuffled minibatches, its old policy the logits before the first of them.

As in the REINFORCE loop, each loss call is timed on detached copies of its
differentiable inputs (logits and values: forward and ``autograd.grad`` to
them), the other implementation (``pgext.reference``'s, or pgext's with
``reference=True``) timed the same way on the same minibatch, and the
gradients then pushed through the networks untimed.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .common import Batch, Config, Result, make_mlp, run, timed


def loss_functions(algo: str, use_reference: bool, need_shadow: bool):
    """((name, loss fn), shadow or None): a2c_error or ppo_error, pgext's and the reference's."""
    import pgext
    from pgext import reference as ref

    name = f"{algo}_error"
    ext_impl, ref_impl = ("pgext", getattr(pgext, name)), ("reference", getattr(ref, name))
    train, shadow = (ref_impl, ext_impl) if use_reference else (ext_impl, ref_impl)
    return train, (shadow if need_shadow else None)


def gae(rewards, values: np.ndarray, gamma: float, lam: float):
    """(advantages, value targets) of one finished episode; no bootstrap after its last step."""
    n = len(rewards)
    adv = np.zeros(n, dtype=np.float64)
    acc = 0.0
    for t in range(n - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        acc = delta + gamma * lam * acc
        adv[t] = acc
    return adv, adv + values


class ActorCritic:
    def __init__(self, config: Config, obs_dim: int, n_actions: int, device: torch.device, impls):
        import pgext

        self.config, self.device = config, device
        self.train_impl, self.shadow_impl = impls
        self.policy = make_mlp(obs_dim, n_actions, config.hidden).to(device)
        self.critic = make_mlp(obs_dim, 1, config.hidden).to(device)
        params = list(self.policy.parameters()) + list(self.critic.parameters())
        self.optim = torch.optim.Adam(params, lr=config.learning_rate())
        self.shuffle = torch.Generator().manual_seed(config.seed + 1)
        self.data = pgext.a2c_data if config.algo == "a2c" else pgext.ppo_data

    def _loss(self, impl, logits, values, rest):
        """Loss values and gradients to (logits, values) of one loss call, and its seconds."""
        config = self.config

        def step():
            z = logits.detach().requires_grad_(True)
            v = values.detach().requires_grad_(True)
            if config.algo == "a2c":
                action, adv, ret = rest
                loss = impl[1](self.data(z, action, v, adv, ret, None))
            else:
                logit_old, action, value_old, adv, ret = rest
                loss, _ = impl[1](self.data(z, logit_old, action, v, value_old, adv, ret, None),
                                  clip_ratio=config.clip_ratio)
            total = loss.policy_loss + config.value_coef * loss.value_loss - config.beta * loss.entropy_loss
            grads = torch.autograd.grad(total, (z, v))
            return (loss.policy_loss.item(), loss.entropy_loss.item(), total.item()), grads

        (out, grads), dt = timed(step, self.device)
        return out, grads, dt

    def _step(self, result: Result, obs, rest, record: bool) -> None:
        logits = self.policy(obs)
        values = self.critic(obs).squeeze(-1)
        shadow_first = self.shadow_impl is not None and result.updates % 2 == 1
        if shadow_first:
            result.shadow_s += self._loss(self.shadow_impl, logits, values, rest)[2]
        out, grads, dt = self._loss(self.train_impl, logits, values, rest)
        result.loss_s += dt
        if self.shadow_impl is not None and not shadow_first:
            result.shadow_s += self._loss(self.shadow_impl, logits, values, rest)[2]
        self.optim.zero_grad(set_to_none=True)
        torch.autograd.backward((logits, values), grads)
        self.optim.step()
        if record:
            result.losses.append(out)

    def update(self, result: Result, batch: Batch) -> None:
        config, device = self.config, self.device
        obs = torch.from_numpy(np.stack(batch.obs)).to(device)
        action = torch.tensor(batch.actions, dtype=torch.int64, device=device)
        with torch.no_grad():
            values = self.critic(obs).squeeze(-1)
            logit_old = self.policy(obs) if config.algo == "ppo" else None
        values_np = values.double().cpu().numpy()
        adv, ret, start = [], [], 0
        for rewards in batch.rewards:
            a, r = gae(rewards, values_np[start:start + len(rewards)], config.gamma, config.gae_lambda)
            adv.append(a)
            ret.append(r)
            start += len(rewards)
        adv_np = np.concatenate(adv)
        adv_np = (adv_np - adv_np.mean()) / (adv_np.std() + 1e-8)
        adv_t = torch.from_numpy(adv_np.astype(np.float32)).to(device)
        ret_t = torch.from_numpy(np.concatenate(ret).astype(np.float32)).to(device)
        if config.algo == "a2c":
            self._step(result, obs, (action, adv_t, ret_t), record=True)
            return
        steps = obs.shape[0]
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(steps, generator=self.shuffle).to(device)
            for first in range(0, steps, config.minibatch):
                idx = order[first:first + config.minibatch]
                rest = (logit_old[idx], action[idx], values[idx], adv_t[idx], ret_t[idx])
                self._step(result, obs[idx], rest, record=epoch == 0 and first == 0)


def train(config: Config, on_episode: Optional[Callable[[Result], None]] = None) -> Result:
    impls = loss_functions(config.algo, config.reference, config.compare)
    names = (impls[0][0], impls[1][0] if impls[1] else None)
    return run(config, lambda obs_dim, n, device: ActorCritic(config, obs_dim, n, device, impls), names, on_episode)
