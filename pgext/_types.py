"""The namedtuples of the original API, shared by pgext and its reference."""
from collections import namedtuple

pg_data = namedtuple("pg_data", ["logit", "action", "return_"])
pg_loss = namedtuple("pg_loss", ["policy_loss", "entropy_loss"])
