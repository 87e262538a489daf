"""REINFORCE with ``pg_error``: the demo's default algorithm.

One update per ``batch_episodes`` finished episodes: the batch's observations
go through the policy once more to get the logits, and the loss is
``policy_loss - beta * entropy_loss`` from ``pg_error`` on discounted returns
normalised over the batch. The loss op is timed on a detached copy of the
logits (forward and ``autograd.grad`` to the logits), so the measured time is
the loss op's own and not the MLP's; the gradient is then pushed through the
MLP untimed. The other implementation (the reference, or pgext with
``reference=True``) is timed the same way on the same batch, its gradient
thrown away.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .common import Batch, Config, Result, discounted_returns, make_mlp, run, timed


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


def _timed_loss(impl, logits: torch.Tensor, actions, returns, beta: float, device):
    """Loss values and d(total)/d(logits), with the seconds the loss op took (forward + backward)."""
    _, pg_error, pg_data = impl

    def step():
        z = logits.detach().requires_grad_(True)
        out = pg_error(pg_data(z, actions, returns))
        total = out.policy_loss - beta * out.entropy_loss
        (grad,) = torch.autograd.grad(total, z)
        return (out.policy_loss.item(), out.entropy_loss.item(), total.item()), grad

    (values, grad), dt = timed(step, device)
    return values, grad, dt


class Reinforce:
    def __init__(self, config: Config, obs_dim: int, n_actions: int, device: torch.device, impls):
        self.config, self.device = config, device
        self.train_impl, self.shadow_impl = impls
        self.policy = make_mlp(obs_dim, n_actions, config.hidden).to(device)
        self.optim = torch.optim.Adam(self.policy.parameters(), lr=config.learning_rate())

    def update(self, result: Result, batch: Batch) -> None:
        config, device = self.config, self.device
        ret = np.concatenate([discounted_returns(r, config.gamma) for r in batch.rewards])
        ret = (ret - ret.mean()) / (ret.std() + 1e-8)
        obs_t = torch.from_numpy(np.stack(batch.obs)).to(device)
        act_t = torch.tensor(batch.actions, dtype=torch.int64, device=device)
        ret_t = torch.from_numpy(ret.astype(np.float32)).to(device)
        logits = self.policy(obs_t)
        # alternate which implementation runs first, so neither always gets warm caches
        shadow_first = self.shadow_impl is not None and result.updates % 2 == 1
        if shadow_first:
            result.shadow_s += _timed_loss(self.shadow_impl, logits, act_t, ret_t, config.beta, device)[2]
        values, grad, dt = _timed_loss(self.train_impl, logits, act_t, ret_t, config.beta, device)
        result.loss_s += dt
        if self.shadow_impl is not None and not shadow_first:
            result.shadow_s += _timed_loss(self.shadow_impl, logits, act_t, ret_t, config.beta, device)[2]
        self.optim.zero_grad(set_to_none=True)
        logits.backward(grad)
        self.optim.step()
        result.losses.append(values)


def train(config: Config, on_episode: Optional[Callable[[Result], None]] = None) -> Result:
    impls = loss_functions(config.reference, config.compare)
    names = (impls[0][0], impls[1][0] if impls[1] else None)
    return run(config, lambda obs_dim, n, device: Reinforce(config, obs_dim, n, device, impls), names, on_episode)
