"""The reporting half of ``python -m pgext.bench``: markdown tables and the plot."""
from __future__ import annotations

from typing import List, Optional, Sequence

from . import targets

IMPL_TITLES = {
    "pgext": "pgext",
    "reference": "reference",
    "compiled": "compiled reference",
    "exp": "exp floor",
}


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    for limit, fmt in ((100, ".1f"), (10, ".2f"), (1, ".3f")):
        if v >= limit:
            return format(v, fmt)
    return format(v, ".4f")


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _shape(rec: dict) -> str:
    return "{}x{}".format(*rec["shape"])


def mode_title(mode: dict, cfg: dict) -> str:
    env = mode["environment"]
    if cfg["device"] == "cuda":
        where = f"cuda ({env.get('gpu', '?')})"
        thp = ""
    else:
        kernels = env.get("pgext_cpu_kernels")
        where = f"cpu {env['cpu_capability']}" + (f" (pgext kernels {kernels})" if kernels else "")
        where += f", {env['threads']} threads"
        thp = {
            "on": "THP on (THP_MEM_ALLOC_ENABLE=1, 2 MiB pages)",
            "off": "THP off (4 KiB pages)",
        }[mode["thp"]] + " - "
    return (
        f"### {cfg['op']}: {thp}{cfg['dtype']}, {where}, torch {env['torch']}, pgext {env['pgext']}"
    )


def mode_report(mode: dict, cfg: dict) -> str:
    results = mode["results"]
    out = [mode_title(mode, cfg), ""]

    rows = []
    for rec in results:
        im, ra = rec["impls"], rec["ratios"]
        pg = im["pgext"]
        per_row = (
            f"{pg['saved_bytes'] / rec['shape'][0]:g}" if pg.get("saved_bytes") is not None else "n/a"
        )
        rows.append(
            [
                _shape(rec),
                *(_ms(im[k].get("median_ms")) for k in ("pgext", "reference", "compiled", "exp")),
                _x(ra["ref/pgext"]),
                _x(ra["compiled/pgext"]),
                _x(ra["pgext/exp"]),
                per_row,
                targets.summary(rec["targets"]),
            ]
        )
    out.append(
        _table(
            [
                "shape",
                "pgext ms",
                "reference ms",
                "compiled ms",
                "exp ms",
                "ref/pgext",
                "compiled/pgext",
                "pgext/exp",
                "saved bytes/row",
                "targets",
            ],
            rows,
        )
    )
    out += ["", "Median ms per forward+backward (exp: forward only); ratios of medians.", ""]

    # minimum times
    out.append(
        _table(
            ["shape", "pgext min ms", "reference min ms", "compiled min ms", "exp min ms", "calls (p/r/c/e)"],
            [
                [
                    _shape(rec),
                    *(_ms(rec["impls"][k].get("min_ms")) for k in ("pgext", "reference", "compiled", "exp")),
                    "/".join(str(rec["impls"][k].get("calls", "-")) for k in ("pgext", "reference", "compiled", "exp")),
                ]
                for rec in results
            ],
        )
    )
    out.append("")

    # saved-for-backward memory
    def saved(rec, k):
        r = rec["impls"][k]
        if r.get("saved_bytes") is None:
            return "n/a", "n/a"
        b = r["saved_bytes"]
        return f"{b / rec['shape'][0]:g}", f"{b / rec['logit_bytes']:.2f}"

    mem_rows = []
    for rec in results:
        pb, pl = saved(rec, "pgext")
        rb, rl = saved(rec, "reference")
        cb, cl = saved(rec, "compiled")
        mem_rows.append([_shape(rec), pb, pl, rb, rl, cb, cl])
    out.append(
        _table(
            [
                "shape",
                "pgext B/row",
                "pgext logit-sized",
                "reference B/row",
                "reference logit-sized",
                "compiled B/row",
                "compiled logit-sized",
            ],
            mem_rows,
        )
    )
    out += [
        "",
        "Saved for backward: unique storages packed by autograd, inputs excluded; "
        "'logit-sized' = saved bytes / bytes of logit.",
        "",
    ]

    # targets, one line each
    trows = [
        [
            _shape(rec),
            t["ratio"],
            f"{t['op']} {t['bound']:g}",
            _x(t["value"]),
            t["status"],
        ]
        for rec in results
        for t in rec["targets"]
    ]
    if trows:
        out.append(_table(["shape", "ratio", "target", "measured", "result"], trows))
        out += ["", "Targets are informational: a MISS never fails the run.", ""]

    errors = [
        f"- {_shape(rec)} {k}: {r['error']}"
        for rec in results
        for k, r in rec["impls"].items()
        if r.get("error") and not r["error"].startswith("skipped")
    ]
    if errors:
        out += ["n/a reasons:"] + errors + [""]
    return "\n".join(out)


def thp_comparison(modes: List[dict]) -> str:
    """Median time with THP off / with THP on, per impl (>1: huge pages help)."""
    by = {m["thp"]: m for m in modes}
    if set(by) != {"on", "off"}:
        return ""
    rows = []
    for off, on in zip(by["off"]["results"], by["on"]["results"]):
        cells = [_shape(off)]
        for k in ("pgext", "reference", "compiled", "exp"):
            a, b = off["impls"][k].get("median_ms"), on["impls"][k].get("median_ms")
            cells.append(_x(a / b) if a and b else "n/a")
        rows.append(cells)
    return (
        "### THP effect: median(THP off) / median(THP on)\n\n"
        + _table(["shape", "pgext", "reference", "compiled", "exp"], rows)
        + "\n"
    )


def plot(modes: List[dict], cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(modes), figsize=(6.4 * len(modes), 4.8), sharey=True, squeeze=False
    )
    styles = {"pgext": "o-", "reference": "s--", "compiled": "^-.", "exp": "x:"}
    for ax, mode in zip(axes[0], modes):
        for k in ("pgext", "reference", "compiled", "exp"):
            pts = sorted(
                (rec["shape"][1], rec["shape"][0], rec["impls"][k]["median_ms"] * 1e6 / rec["elements"])
                for rec in mode["results"]
                if rec["impls"][k].get("median_ms")
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], styles[k], label=IMPL_TITLES[k])
        for rec in mode["results"]:
            t = rec["impls"]["pgext"].get("median_ms")
            if t:
                ax.annotate(
                    _shape(rec), (rec["shape"][1], t * 1e6 / rec["elements"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="gray",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (actions per row)")
        ax.grid(True, which="both", alpha=0.3)
        thp = f"THP {mode['thp']}, " if cfg["device"] == "cpu" else ""
        ax.set_title(f"{thp}{cfg['dtype']}, {cfg['device']}, {mode['environment']['threads']} threads")
        ax.legend()
    axes[0][0].set_ylabel("ns per logit element (median, fwd+bwd)")
    fig.suptitle(f"{cfg['op']} forward+backward, pgext {modes[0]['environment']['pgext']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
