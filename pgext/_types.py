"""The namedtuples of the APIs pgext keeps: the notebook's pg_error, and
DI-engine's ``ding.rl_utils`` PPO and A2C losses (field names and order as
there, so that code written against either swaps an import)."""
from collections import namedtuple

pg_data = namedtuple("pg_data", ["logit", "action", "return_"])
pg_loss = namedtuple("pg_loss", ["policy_loss", "entropy_loss"])

ppo_policy_data = namedtuple("ppo_policy_data", ["logit_new", "logit_old", "action", "adv", "weight"])
ppo_data = namedtuple(
    "ppo_data", ["logit_new", "logit_old", "action", "value_new", "value_old", "adv", "return_", "weight"])
ppo_value_data = namedtuple("ppo_value_data", ["value_new", "value_old", "return_", "weight"])
ppo_policy_loss = namedtuple("ppo_policy_loss", ["policy_loss", "entropy_loss"])
ppo_loss = namedtuple("ppo_loss", ["policy_loss", "value_loss", "entropy_loss"])
ppo_info = namedtuple("ppo_info", ["approx_kl", "clipfrac"])

a2c_data = namedtuple("a2c_data", ["logit", "action", "value", "adv", "return_", "weight"])
a2c_loss = namedtuple("a2c_loss", ["policy_loss", "value_loss", "entropy_loss"])
