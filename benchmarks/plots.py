"""PNG plots for people: speedup vs batch, speedup vs context, achieved bandwidth vs the copy peak."""
from __future__ import annotations

from pathlib import Path


def _by_shape(rows):
    shapes = {}
    for r in rows:
        shapes.setdefault(r["shape"], []).append(r)
    return shapes


def _speedup(r, x_key, series_key, fname, out, title):
    import matplotlib.pyplot as plt

    shapes = _by_shape([x for x in r["decode"] if x["policy"] == "k4v4"])
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(5 * max(1, len(shapes)), 4), squeeze=False)
    for ax, (shape, rows) in zip(axes[0], shapes.items()):
        for s in sorted({x[series_key] for x in rows}):
            pts = sorted((x for x in rows if x[series_key] == s), key=lambda x: x[x_key])
            for base, style in (("speedup_vs_k16v16", "-o"), ("speedup_vs_sdpa", "--x")):
                xy = [(x[x_key], x[base]) for x in pts if x.get(base)]
                if xy:
                    ax.plot(*zip(*xy), style, label=f"{series_key} {s} {base[11:]}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel("K4V4 speedup (baseline time / ours)")
        ax.set_title(shape)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def _bandwidth(r, out):
    import matplotlib.pyplot as plt

    shapes = _by_shape(r["decode"])
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(5 * max(1, len(shapes)), 4), squeeze=False)
    for ax, (shape, rows) in zip(axes[0], shapes.items()):
        for policy in dict.fromkeys(x["policy"] for x in rows):
            pts = sorted((x for x in rows if x["policy"] == policy), key=lambda x: x["bytes"])
            ax.plot([x["bytes"] / 2 ** 20 for x in pts], [x["gbs"] for x in pts], "o", label=policy, ms=4)
        if r["copy_bandwidth_gbs"]:
            ax.axhline(r["copy_bandwidth_gbs"], color="k", lw=1, label="copy peak")
            ax.axhline(0.85 * r["copy_bandwidth_gbs"], color="k", lw=0.8, ls=":", label="85 % goal")
        ax.set_xscale("log")
        ax.set_xlabel("bytes moved per call (MiB)")
        ax.set_ylabel("achieved GB/s")
        ax.set_title(shape)
        ax.legend(fontsize=6)
    fig.suptitle("Decode: achieved bandwidth vs measured copy peak")
    fig.tight_layout()
    fig.savefig(out / "bandwidth.png", dpi=110)
    plt.close(fig)
    return "bandwidth.png"


def make_plots(r: dict, out: Path) -> list[str]:
    """Write the PNGs into ``out``; returns their names, or records why none were made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        r["notes"].append("plots skipped: matplotlib not importable")
        return []
    if not r["decode"]:
        return []
    return [_speedup(r, "batch", "context", "speedup_vs_batch.png", out, "Decode K4V4 speedup vs batch"),
            _speedup(r, "context", "batch", "speedup_vs_context.png", out, "Decode K4V4 speedup vs context"),
            _bandwidth(r, out)]
