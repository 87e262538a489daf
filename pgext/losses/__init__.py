"""The user-facing losses: the notebook's ``pg_error`` and DI-engine's PPO and
A2C losses (``ding.rl_utils``' API and namedtuples), and ``linear_pg_error`` on
the fused output layer, on pgext's ops."""
from .a2c import a2c_error
from .policy_gradient import pg_error
from .ppo import ppo_error, ppo_policy_error, ppo_value_error
from .linear_policy_gradient import linear_pg_error

__all__ = ["pg_error", "a2c_error", "ppo_error", "ppo_policy_error", "ppo_value_error", "linear_pg_error"]
