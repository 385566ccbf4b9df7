"""Plots of the jobs' reports (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_compare", "plot_digits_eval", "plot_schedules"]


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError('--plot needs matplotlib: pip install "diffsamplers[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(report: dict[str, Any], path: str | Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in report["methods"]:
        pts = [(int(k), v) for k, v in m["errors"].items() if v is not None]
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        style = "-o" if m["library"] == "diffsamplers" else "--s"
        ax.loglog(
            xs, ys, style, label=m["name"], markersize=4, linewidth=1.3 if m["library"] == "diffsamplers" else 1.0
        )
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("RMS error vs exact PF-ODE solution")
    flow = report.get("process_name") == "flow"
    ax.set_title("Solver error on the bundled Gaussian mixture" + (", rectified flow from t = 1" if flow else ""))
    ax.set_xticks(report["nfe"], [str(n) for n in report["nfe"]])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_digits_eval(report: dict[str, Any], path: str | Path) -> None:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in report["methods"]:
        style = "--s" if m["solver"].startswith("diffusers:") else "-o"
        xs = report["nfe"]
        axes[0].plot(xs, [_nan(m["fd_digits"][str(n)]) for n in xs], style, label=m["name"], markersize=4)
        axes[1].plot(xs, [_nan(m["class_accuracy"][str(n)]) for n in xs], style, label=m["name"], markersize=4)
    axes[0].axhline(report["held_out"]["fd_digits"], color="k", linewidth=0.8, linestyle=":", label="held-out digits")
    axes[1].axhline(report["held_out"]["class_accuracy"], color="k", linewidth=0.8, linestyle=":")
    axes[0].set_yscale("log")
    for ax, label in zip(axes, ("FD-digits (lower is better)", "class accuracy")):
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.set_xticks(report["nfe"])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Bundled digits model, {report['num_samples']} samples, guidance {report.get('guidance', report['guidance_scale'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(
    path: str | Path,
    schedules: dict[str, np.ndarray],
    klub_history: list[float] | None = None,
    title: str = "Align Your Steps",
) -> Path:
    """log σ̃ against the step fraction for named level lists, and (if given) the KLUB per sweep."""
    plt = _pyplot()

    ncols = 2 if klub_history else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    for name, levels in schedules.items():
        lv = np.asarray(levels, dtype=np.float64)
        lv = lv[lv > 0]
        ax.semilogy(np.linspace(0, 1, lv.size), lv, "-o", markersize=3, label=f"{name} ({lv.size - 1} steps)")
    ax.set_xlabel("step / number of steps")
    ax.set_ylabel("noise level σ̃")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if klub_history:
        ax2 = axes[0, 1]
        ax2.plot(range(len(klub_history)), klub_history, "-o", markersize=3)
        ax2.set_xlabel("sweep")
        ax2.set_ylabel("estimated KLUB")
        ax2.set_yscale("log")
        ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
