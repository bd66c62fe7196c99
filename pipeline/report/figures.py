"""The report's matplotlib figures (PNG bytes), drawn from the view-model's numbers."""

from __future__ import annotations

import io
from typing import Any

from pipeline.report.summary import ReportView


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def win_rate_figure(comparisons: list[dict[str, Any]]) -> bytes | None:
    """Win rate with its 95 % interval per comparison, overall and per chart type; LC rate as a diamond."""
    if not comparisons:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(comparisons), figsize=(4.2 * len(comparisons), 3.6), sharey=True,
                             squeeze=False)
    for ax, c in zip(axes[0], comparisons):
        groups = [("all", c)] + list(c["by_type"].items())
        xs = range(len(groups))
        rates = [g["win_rate"] if g["win_rate"] is not None else float("nan") for _, g in groups]
        low = [max(0.0, r - g["ci95"][0]) if g["ci95"] else 0 for r, (_, g) in zip(rates, groups)]
        high = [max(0.0, g["ci95"][1] - r) if g["ci95"] else 0 for r, (_, g) in zip(rates, groups)]
        colors = ["#3b6ea8" if name == "all" else "#8fb3d9" for name, _ in groups]
        ax.bar(xs, rates, color=colors, yerr=[low, high], capsize=4, ecolor="#222")
        lc = [g["length_controlled"]["win_rate"] for _, g in groups]
        ax.scatter([x for x, v in zip(xs, lc) if v is not None], [v for v in lc if v is not None],
                   marker="D", color="#d9822b", zorder=3, label="length-controlled")
        ax.axhline(0.5, color="#888", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs), [f"{name}\nn={g['n']}" for name, g in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{c['a']} vs {c['b']}", fontsize=10)
    axes[0][0].set_ylabel("win rate of the first model (95 % CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    return _png(fig)


def loss_figure(series: dict[str, dict[str, list[tuple[float, float]]]]) -> bytes | None:
    """Training and validation loss of every variant on one plot."""
    if not any(s["train"] or s["validation"] for s in series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (variant, s) in enumerate(sorted(series.items())):
        color = f"C{i}"
        if s["train"]:
            ax.plot(*zip(*s["train"]), color=color, alpha=0.6, label=f"{variant} train")
        if s["validation"]:
            ax.plot(*zip(*s["validation"]), color=color, marker="o", linewidth=2, label=f"{variant} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def render_figures(view: ReportView) -> dict[str, bytes]:
    """PNG files stored beside report.md: ``win_rates.png``, ``loss_curves.png``, ``loss-<variant>.png``."""
    out = {}
    win = win_rate_figure(view.summary["comparisons"])
    if win:
        out["win_rates.png"] = win
    loss = loss_figure(view.loss_series)
    if loss:
        out["loss_curves.png"] = loss
    for variant, png in view.loss_pngs.items():
        out[f"loss-{variant}.png"] = png
    return out
