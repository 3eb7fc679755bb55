"""DET curves and score histograms as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Curve", "det_png", "histogram_png"]


@dataclass
class Curve:
    label: str
    fmr: np.ndarray
    fnmr: np.ndarray
    #: the smallest FMR the data can show (1 / impostor comparisons)
    fmr_floor: float = 0.0
    style: str = "-"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def det_png(path: Path, curves: list[Curve], *, title: str, marks: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6),
            note: str = "") -> Path:
    """FNMR against FMR, both on log axes; dashed lines at the target FMRs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 5.2), dpi=110)
    lo_x, lo_y = 1e-8, 1e-4
    for c in curves:
        keep = (c.fmr > 0) & (c.fnmr > 0)
        if c.fmr_floor > 0:
            keep &= c.fmr >= c.fmr_floor * 0.999
        if not keep.any():
            continue
        order = np.argsort(c.fmr[keep])
        ax.plot(c.fmr[keep][order], c.fnmr[keep][order], c.style, label=c.label, linewidth=1.6)
        lo_x = min(lo_x, float(c.fmr[keep].min()))
        lo_y = min(lo_y, float(c.fnmr[keep].min()) / 2)
    for m in marks:
        ax.axvline(m, color="0.7", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(max(lo_x / 2, 1e-12), 1.0)
    ax.set_ylim(lo_y, 1.0)
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram_png(
    path: Path, *, title: str, genuine: np.ndarray, impostor_edges: np.ndarray, impostor_counts: np.ndarray,
    thresholds: dict[str, float] | None = None, xlabel: str = "score", bins: int = 120,
) -> Path:
    """Genuine and impostor score densities (log y, so that the tails show)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=110)
    g = np.asarray(genuine, dtype=np.float64)
    lo = float(min(g.min() if g.size else 0.0, impostor_edges[np.argmax(impostor_counts > 0)]))
    nz = np.flatnonzero(impostor_counts)
    hi_imp = float(impostor_edges[nz[-1] + 1]) if nz.size else 1.0
    hi = float(max(g.max() if g.size else 1.0, hi_imp))
    edges = np.linspace(lo, hi, bins + 1)
    # re-bin the impostor histogram onto the plotting bins
    centres = 0.5 * (impostor_edges[:-1] + impostor_edges[1:])
    imp, _ = np.histogram(centres, bins=edges, weights=impostor_counts.astype(np.float64))
    width = edges[1] - edges[0]
    total = impostor_counts.sum()
    if total:
        ax.stairs(imp / total / width, edges, label=f"different people ({int(total):,})", color="tab:red")
    if g.size:
        gh, _ = np.histogram(g, bins=edges)
        ax.stairs(gh / g.size / width, edges, label=f"same person ({g.size:,})", color="tab:blue")
    for name, t in (thresholds or {}).items():
        ax.axvline(t, linestyle="--", linewidth=0.8, color="0.4")
        ax.text(t, 1.0, name, rotation=90, fontsize=7, va="bottom", ha="right",
                transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
