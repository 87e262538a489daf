"""Performance targets of ``python -m pgext.bench``: the single table of data.

Each target is informational: the benchmark prints PASS/MISS next to the
ratios and never fails because of one.  Ratios are of median times:

* ``ref/pgext``      reference time / pgext time        (higher is better)
* ``compiled/pgext`` torch.compile(reference) / pgext   (higher is better)
* ``pgext/exp``      pgext time / torch.exp floor time  (lower is better)
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

Shape = Tuple[int, int]

RATIOS = ("ref/pgext", "compiled/pgext", "pgext/exp")
SHORT = {"ref/pgext": "ref", "compiled/pgext": "cmp", "pgext/exp": "exp"}


class Target(NamedTuple):
    shapes: Tuple[Shape, ...]
    ratio: str  # one of RATIOS
    op: str  # ">=" or "<="
    bound: float
    bench: str = "pg_error"  # the --op it is a target of


_LARGE = ((2048, 32000), (512, 151936))
_TINY = ((64, 2), (256, 18))
_MID = ((4096, 1000),)

# The one place the targets live.
TARGETS: Tuple[Target, ...] = (
    Target(_TINY, "ref/pgext", ">=", 8.0),
    Target(_TINY, "compiled/pgext", ">=", 5.0),
    Target(_MID, "ref/pgext", ">=", 10.0),
    Target(_MID, "compiled/pgext", ">=", 2.5),
    Target(_MID, "pgext/exp", "<=", 2.0),
    Target(_LARGE, "ref/pgext", ">=", 15.0),
    Target(_LARGE, "compiled/pgext", ">=", 3.0),
    Target(_LARGE, "pgext/exp", "<=", 1.5),
    Target(_MID + _LARGE, "ref/pgext", ">=", 10.0, "log_prob_entropy"),
    Target(_MID + _LARGE, "compiled/pgext", ">=", 3.0, "log_prob_entropy"),
    Target(_TINY, "ref/pgext", ">=", 3.0, "ppo"),
    Target(_MID, "ref/pgext", ">=", 8.0, "ppo"),
)


def targets_for(bench: str, shape: Shape) -> List[Target]:
    return [t for t in TARGETS if t.bench == bench and tuple(shape) in t.shapes]


def evaluate(bench: str, shape: Shape, ratios: Dict[str, Optional[float]]) -> List[dict]:
    """One record per target of ``bench`` (the --op) at ``shape``: status is PASS, MISS or n/a."""
    out = []
    for t in targets_for(bench, shape):
        value = ratios.get(t.ratio)
        if value is None:
            status = "n/a"
        elif t.op == ">=":
            status = "PASS" if value >= t.bound else "MISS"
        else:
            status = "PASS" if value <= t.bound else "MISS"
        out.append(
            dict(ratio=t.ratio, op=t.op, bound=t.bound, value=value, status=status)
        )
    return out


def label(rec: dict) -> str:
    """Compact form, e.g. ``ref>=10``."""
    return f"{SHORT[rec['ratio']]}{rec['op']}{rec['bound']:g}"


def summary(records: List[dict]) -> str:
    """The main table's cell: ``PASS 5/5``, ``MISS: cmp>=3 exp<=1.5`` or ``-``."""
    if not records:
        return "-"
    missed = [label(r) for r in records if r["status"] == "MISS"]
    unknown = [label(r) for r in records if r["status"] == "n/a"]
    if missed:
        return "MISS: " + " ".join(missed)
    passed = sum(r["status"] == "PASS" for r in records)
    text = f"PASS {passed}/{len(records)}"
    if unknown:
        text += " (n/a: " + " ".join(unknown) + ")"
    return text
