"""Cross-rank validation for pgext.distributed: one small header per rank.

Every call of ``pgext.distributed.pg_error`` all-gathers a fixed-size int64
header from each rank *before* any collective whose size depends on the data.
That order is what makes bad input an exception instead of a crash: Gloo
aborts the process (SIGABRT) when ranks all-reduce tensors of different
lengths, and NCCL hangs until its timeout. The header is exchanged on every
call rather than cached, because the number of rows is per-call data
(variable-length batches) and no rank can know whether another rank's cache
would have hit: a rank that skips the exchange while another does not would
pair an all-gather with an all-reduce.

All ranks receive the same table and run the same checks on it, so they all
raise the same kind of exception at the same point and the group stays in
step for the next call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._errors import ActionOutOfRangeError

FIELDS = (
    "status",       # 0: the local checks passed, 1: this rank raised (it re-raises its own error)
    "rows",         # number of samples
    "n_local",      # classes in this rank's shard
    "vocab_start",  # first class id of this rank's shard
    "action_min",
    "action_max",
    "shape_hash",   # hash of action.shape: same row count but different dims is still a mismatch
    "action_fp",    # fingerprints: action, return_ and weight must be the same on every rank
    "return_fp",
    "weight_fp",
    "has_weight",
    "dtype",        # index into _DTYPES: the all-reduces need the same dtype everywhere
    "reduction",    # index into _REDUCTIONS
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOW21 = (1 << 21) - 1
_LOW31 = (1 << 31) - 1


def _fold31(v: torch.Tensor) -> torch.Tensor:
    """int64 values (any) -> [0, 2**31): every bit counts. The upper bits are
    scrambled first, so that they cannot cancel the lower ones (a sign
    extension would otherwise map -2**31 to 0)."""
    return (v & _LOW31) ^ _mix31(((v >> 31) & _LOW31) ^ (((v >> 62) & 3) << 29))


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A scrambling map of [0, 2**31) into itself: two multiplications by odd
    constants, each followed by folding the high bits down. No intermediate
    exceeds 2**53, so int64 never overflows."""
    for c in (0x5BD1E995, 0x27D4EB2F):
        x = (x & _LOW21) * c + (x >> 21) * (c >> 9 | 1)
        x = (x ^ (x >> 29) ^ (x >> 47)) & _LOW31
    return x


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """An int64 digest of a tensor's values (its bits for floats), in flat
    order: the sum over elements of a scrambled mix of value and position, so
    that a changed value, or two values swapped, changes it with probability
    about 1 - 2**-31. Integer arithmetic only: the same values give the same
    digest whatever the thread count or device, and the sum cannot overflow
    (each term is below 2**31, so up to 2**32 elements are safe)."""
    t = t.detach().reshape(-1)
    if t.is_floating_point():
        t = t.view(_INT_VIEW[t.element_size()])
    value = _mix31(_fold31(t.long()))
    position = _mix31(_fold31(torch.arange(t.numel(), device=t.device)) ^ 0x2545F491)
    return _mix31(value ^ position).sum()


def checked_actions(action: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The actions the range check reads: a sample of weight 0 (padding) may
    carry any action, so its action counts as 0. No host synchronization."""
    if weight is None:
        return action
    return torch.where(weight.expand(action.shape) == 0, torch.zeros((), dtype=action.dtype, device=action.device),
                       action)


def build_header(
    logit: Optional[torch.Tensor],
    action: Optional[torch.Tensor],
    return_: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    vocab_start: int,
    reduction: str,
    device: torch.device,
    ok: bool,
) -> torch.Tensor:
    """This rank's header, on ``device``; no host synchronization. A rank whose
    local checks failed sends only ``status = 1``."""
    if not ok:
        header = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        header[0] = 1
        return header
    rows = action.numel()
    meta = [0, rows, logit.shape[-1], vocab_start, 0, -1, hash(tuple(action.shape))]
    meta += [0, 0, 0, int(weight is not None), _DTYPES.index(logit.dtype), _REDUCTIONS.index(reduction)]
    header = torch.tensor(meta, dtype=torch.int64, device=device)
    if rows:
        lo, hi = torch.aminmax(checked_actions(action.detach(), weight).reshape(-1).long())
        header[4], header[5] = lo, hi
        header[7] = _fingerprint(action)
        header[8] = _fingerprint(return_)
        if weight is not None:
            header[9] = _fingerprint(weight)
    return header


def _spans(table: Sequence[dict]) -> str:
    return ", ".join(
        f"rank {r}: [{h['vocab_start']}, {h['vocab_start'] + h['n_local']})" for r, h in enumerate(table))


def _per_rank(table: Sequence[dict], field: str, show=lambda v: v) -> str:
    return "[" + ", ".join(str(show(h[field])) for h in table) + "]"


def check_headers(
    rows: List[List[int]], rank: int, local_error: Optional[BaseException], action: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
) -> int:
    """Validates the gathered headers; returns the total number of classes.

    Raises on every rank alike: this rank's own error if its local checks
    failed, ValueError for inconsistent ranks, ActionOutOfRangeError for an action
    outside the whole vocabulary."""
    table = [dict(zip(FIELDS, r)) for r in rows]
    if local_error is not None:
        raise local_error
    failed = [r for r, h in enumerate(table) if h["status"] != 0]
    if failed:
        raise ValueError(
            f"pg_error: rank(s) {failed} of the group rejected their inputs (the error is raised there "
            "in full); this rank's inputs passed the local checks, and no collective ran on the logits")

    def differs(field: str) -> bool:
        return any(h[field] != table[0][field] for h in table)

    if differs("dtype"):
        raise ValueError(
            "pg_error: the logit shards must have the same dtype on every rank, got "
            + _per_rank(table, "dtype", lambda i: str(_DTYPES[i]).replace("torch.", "")))
    if differs("reduction"):
        raise ValueError(
            "pg_error: every rank must pass the same reduction, got "
            + _per_rank(table, "reduction", lambda i: _REDUCTIONS[i]))
    if differs("rows") or differs("shape_hash"):
        raise ValueError(
            "pg_error: every rank must hold the same samples (the logits are split over classes, not "
            f"over the batch): samples per rank {_per_rank(table, 'rows')}; this rank's action has shape "
            f"{tuple(action.shape)}")

    order = sorted(range(len(table)), key=lambda r: table[r]["vocab_start"])
    end = 0
    for r in order:
        if table[r]["vocab_start"] != end:
            raise ValueError(
                "pg_error: the logit shards must tile the classes [0, N) without gaps or overlaps, got "
                f"{_spans(table)}. The default vocab_start is rank * N_local, which assumes shards of "
                "equal size; pass vocab_start= for uneven shards")
        end += table[r]["n_local"]
    n_global = end

    lo = min(h["action_min"] for h in table)
    hi = max(h["action_max"] for h in table)
    if table[0]["rows"] and (lo < 0 or hi >= n_global):
        _raise_out_of_range(table, rank, checked_actions(action, weight), n_global, lo if lo < 0 else hi)

    for field, name in (("action_fp", "action"), ("has_weight", "weight (given or None)"),
                        ("return_fp", "return_"), ("weight_fp", "weight")):
        if differs(field):
            raise ValueError(
                f"pg_error: {name} must be identical on every rank (each rank computes the whole "
                f"loss from it); it differs between ranks {[r for r, h in enumerate(table) if h[field] != table[0][field]]} "
                "and rank 0. Broadcast it, or check that every rank of the group reads the same batch")
    return n_global


def _raise_out_of_range(table, rank: int, action: torch.Tensor, n_global: int, value: int):
    expect = (f"for N = {n_global} classes (the vocabulary of all {len(table)} shards); "
              f"expected 0 <= action < {n_global}")
    flat = action.detach().reshape(-1).long()
    # the value the caller passed: a uint64 action of 2**63 or more reads negative as int64
    as_passed = (lambda v: v % 2**64) if action.dtype == torch.uint64 else (lambda v: v)
    bad = ((flat < 0) | (flat >= n_global)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ActionOutOfRangeError(f"pg_error: action {as_passed(int(flat[i]))} (sample {i}) is out of range {expect}")
    owner = next(r for r, h in enumerate(table) if h["action_min"] == value or h["action_max"] == value)
    raise ActionOutOfRangeError(f"pg_error: rank {owner}'s action {as_passed(value)} is out of range {expect}")
