"""The ops ``python -m pgext.bench --op`` times: for each, its inputs, pgext's
call, the eager reference it is compared with, and the scalar that is
backpropagated. The ``compiled`` column is ``torch.compile`` of the reference,
the ``exp`` column one ``torch.exp`` of the logits (forward only)."""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import torch

ENTROPY_WEIGHT = 0.01


class BenchOp(NamedTuple):
    name: str
    summary: str  # what one timed call does, for the report
    make_inputs: Callable[..., Tuple[torch.Tensor, ...]]  # (rows, n, dtype, device, gen); the first requires grad
    pgext: Callable[..., tuple]  # (*inputs) -> outputs
    reference: Callable[..., tuple]
    loss: Callable[..., torch.Tensor]  # (outputs, *inputs) -> the scalar backpropagated


def _randn(rows, gen, dtype, device):
    return torch.randn(rows, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _logit(rows, n, dtype, device, gen):
    logit = torch.randn(rows, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return logit.requires_grad_(True)


def _action(rows, n, device, gen):
    return torch.randint(0, n, (rows,), generator=gen, dtype=torch.int64).to(device)


# ------------------------------------------------------------------ pg_error
def _pg_inputs(rows, n, dtype, device, gen):
    return _logit(rows, n, dtype, device, gen), _action(rows, n, device, gen), _randn(rows, gen, dtype, device)


def _pg_pgext(logit, action, return_):
    import pgext

    return pgext.pg_error(pgext.pg_data(logit, action, return_))


def _pg_reference(logit, action, return_):
    from pgext import reference

    return reference.pg_error(reference.pg_data(logit, action, return_))


def _policy_minus_entropy(out, *inputs):
    return out.policy_loss - ENTROPY_WEIGHT * out.entropy_loss


# ---------------------------------------------------------- log_prob_entropy
def _lpe_inputs(rows, n, dtype, device, gen):
    # upstream gradients of both per-sample outputs, float32 as the outputs are
    return (_logit(rows, n, dtype, device, gen), _action(rows, n, device, gen),
            _randn(rows, gen, torch.float32, device), _randn(rows, gen, torch.float32, device))


def _lpe_pgext(logit, action, *upstream):
    import pgext

    return pgext.log_prob_entropy(logit, action)


def _lpe_eager(logit, action, *upstream):
    """What TRL- and verl-style code writes: log_softmax, a gather, the
    entropy from the probabilities, in float32."""
    logp = torch.log_softmax(logit.float(), -1)
    log_prob = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return log_prob, entropy


def _lpe_loss(out, logit, action, g_log_prob, g_entropy):
    return (out[0] * g_log_prob).sum() + (out[1] * g_entropy).sum()


# ------------------------------------------------------------------------ ppo
def _ppo_inputs(rows, n, dtype, device, gen):
    new = _logit(rows, n, dtype, device, gen)
    old = (new.detach() + 0.3 * torch.randn(rows, n, generator=gen).to(device=device, dtype=dtype))
    return new, old, _action(rows, n, device, gen), _randn(rows, gen, dtype, device)


def _ppo_pgext(logit_new, logit_old, action, adv):
    import pgext

    return pgext.ppo_policy_error(pgext.ppo_policy_data(logit_new, logit_old, action, adv, None))[0]


def _ppo_reference(logit_new, logit_old, action, adv):
    from pgext import reference

    return reference.ppo_policy_error((logit_new, logit_old, action, adv, None))[0]


OPS: Dict[str, BenchOp] = {
    "pg_error": BenchOp(
        "pg_error", "loss = pg_error(pg_data(logit, action, return_)); "
        "(loss.policy_loss - 0.01 * loss.entropy_loss).backward(); reference: Categorical",
        _pg_inputs, _pg_pgext, _pg_reference, _policy_minus_entropy),
    "log_prob_entropy": BenchOp(
        "log_prob_entropy", "log_prob, entropy = log_prob_entropy(logit, action); backward of "
        "sum(g1 * log_prob + g2 * entropy); reference: log_softmax, gather, entropy from the probabilities",
        _lpe_inputs, _lpe_pgext, _lpe_eager, _lpe_loss),
    "ppo": BenchOp(
        "ppo", "loss, info = ppo_policy_error(ppo_policy_data(logit_new, logit_old, action, adv, None)); "
        "(loss.policy_loss - 0.01 * loss.entropy_loss).backward(); reference: DI-engine's Categorical code",
        _ppo_inputs, _ppo_pgext, _ppo_reference, _policy_minus_entropy),
}
