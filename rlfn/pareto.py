"""PSNR-vs-runtime Pareto front and chart.

A model is on the front when no other model is both at least as fast and at least as
accurate (and strictly better in one of the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["pareto_front", "plot_pareto"]


def pareto_front(runtimes: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """For each point, whether it is on the front (lower runtime and higher score win)."""
    if len(runtimes) != len(scores):
        raise ValueError("runtimes and scores differ in length")
    pts = list(zip(runtimes, scores))
    return [not any(r2 <= r and s2 >= s and (r2 < r or s2 > s) for r2, s2 in pts)
            for r, s in pts]


def plot_pareto(rows: Sequence[dict], path: str | Path, *, title: str,
                runtime_label: str = "CPU runtime (ms / image)") -> Path | None:
    """One panel per set: each row ``{"label", "set", "psnr_y", "runtime_ms", "kind"}`` is a
    point, the front is joined by a line and labelled. Returns the PNG path (``None`` when
    there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    sets = list(dict.fromkeys(r["set"] for r in rows))
    if not sets:
        return None
    markers = {"official": "s", "stage": "o", "registry": "^", "backend": "P"}
    fig, axes = plt.subplots(1, len(sets), figsize=(6.2 * len(sets), 4.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        pts = [r for r in rows if r["set"] == name]
        front = pareto_front([r["runtime_ms"] for r in pts], [r["psnr_y"] for r in pts])
        for kind in dict.fromkeys(r.get("kind", "model") for r in pts):
            sel = [r for r in pts if r.get("kind", "model") == kind]
            ax.scatter([r["runtime_ms"] for r in sel], [r["psnr_y"] for r in sel],
                       marker=markers.get(kind, "D"), s=46, label=kind, zorder=3)
        on = sorted((r for r, f in zip(pts, front) if f), key=lambda r: r["runtime_ms"])
        ax.plot([r["runtime_ms"] for r in on], [r["psnr_y"] for r in on], "k--", lw=1,
                label="Pareto front", zorder=2)
        for r, f in zip(pts, front):
            ax.annotate(r["label"], (r["runtime_ms"], r["psnr_y"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7, fontweight="bold" if f else "normal")
        ax.set_xlabel(runtime_label)
        ax.set_ylabel(f"{name} Y-PSNR (dB)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
