"""Training curves and AP bar charts of ``train_net.py`` runs, written as image files.

Figures are drawn on matplotlib's Agg canvas (``Figure`` + ``FigureCanvasAgg``): no display is
needed and pyplot's global state is left alone, so these functions can be called from tests,
scripts and notebooks alike. The rows come from :func:`maskpyramid.engine.runs.read_metrics`.
"""

import math
import os
import re
from typing import Dict, List, Optional, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_training_curves", "plot_ap_bars", "plot_comparison"]

DPI = 120
# The per-level losses of MaskPyramid (one per pyramid level, e.g. loss_mask_p3).
LEVEL_LOSS = re.compile(r"loss_(mask|pseudo)_p(\d+)$")
# Told apart by line style when several runs share a panel of several keys.
LINESTYLES = ("-", "--", ":", "-.")
AP_METRICS = ("AP", "APs", "APm", "APl")


def _level_order(key: str):
    kind, level = LEVEL_LOSS.match(key).groups()
    return kind, int(level)


def _curve_panels(runs: Dict[str, List[dict]]) -> List[Tuple[str, List[str]]]:
    """The panels of :func:`plot_training_curves`: (title, keys) for each panel with data, in
    the order total loss, per-level mask losses, other losses, learning rate."""
    keys = set()
    for rows in runs.values():
        for row in rows:
            if "iteration" in row:
                keys.update(k for k, v in row.items() if isinstance(v, (int, float)))
    levels = sorted((k for k in keys if LEVEL_LOSS.match(k)), key=_level_order)
    others = sorted(k for k in keys if k.startswith("loss_") and not LEVEL_LOSS.match(k))
    panels = [
        ("total loss", ["total_loss"] if "total_loss" in keys else []),
        ("mask losses per level", levels),
        ("other losses", others),
        ("learning rate", ["lr"] if "lr" in keys else []),
    ]
    return [(title, ks) for title, ks in panels if ks]


def _series(rows: List[dict], key: str, smooth: int) -> Tuple[List[float], List[float]]:
    """(iterations, values) of ``key``, each value the mean of the last ``smooth`` ones."""
    points = [(r["iteration"], r[key]) for r in rows if key in r and "iteration" in r]
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    if smooth > 1:
        ys = [sum(ys[max(0, i - smooth + 1) : i + 1]) / (i + 1 - max(0, i - smooth + 1))
              for i in range(len(ys))]  # fmt: skip
    return xs, ys


def _save(fig: Figure, path: str) -> str:
    """Writes ``fig`` to ``path`` (creating its directory) and frees it."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clear()
    return path


def plot_training_curves(runs: Dict[str, List[dict]], path: str, smooth: int = 1) -> str:
    """One figure of the training curves of several runs, overlaid.

    Panels (those without data are left out): total loss; the per-level mask losses
    (``loss_mask_p<k>``, ``loss_pseudo_p<k>``); every other ``loss_*``; the learning rate.

    Args:
        runs: run label -> rows of its ``metrics.json``.
        path: the image file to write (format from its extension; PNG without one).
        smooth: each point is the mean of this many last logged values (1: raw).

    Returns:
        ``path``.

    Raises:
        ValueError: no run has a training row (one with ``total_loss``), or ``smooth < 1``.
    """
    if smooth < 1:
        raise ValueError(f"smooth must be at least 1, got {smooth}")
    if not any("total_loss" in r for rows in runs.values() for r in rows):
        raise ValueError(f"no training rows (total_loss) in runs {', '.join(runs) or '(none)'}")
    panels = _curve_panels(runs)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows))
    colours = [f"C{i % 10}" for i in range(max(len(runs), 10))]
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for r, (label, rows) in enumerate(runs.items()):
            for k, key in enumerate(keys):
                xs, ys = _series(rows, key, smooth)
                if not xs:
                    continue
                if len(keys) == 1:  # one colour per run
                    style = dict(color=colours[r], label=label)
                else:  # one colour per key, one line style per run
                    name = f"{label}: {key}" if len(runs) > 1 else key
                    style = dict(color=f"C{k % 10}", linestyle=LINESTYLES[r % 4], label=name)
                ax.plot(xs, ys, linewidth=1.2, **style)
        ax.set_title(title + (f" (mean of {smooth} points)" if smooth > 1 else ""))
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if keys == ["lr"]:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_ap_bars(
    results: Dict[str, dict],
    path: str,
    task: str = "segm",
    errors: Optional[Dict[str, dict]] = None,
    title: Optional[str] = None,
) -> str:
    """A grouped bar chart of AP, APs, APm and APl, one colour per model.

    Args:
        results: model label -> its metrics (e.g. :func:`maskpyramid.engine.runs.last_evaluation`,
            or a mean over runs), in percent.
        path: the image file to write (format from its extension; PNG without one).
        task: "segm" or "bbox", for the axis label.
        errors: model label -> the standard deviation of each metric, drawn as error bars
            (models left out, or metrics missing, get none).
        title: the figure's title (default: "<task> AP of the final evaluation").

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` is empty.
    """
    if not results:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(max(6.4, 1.0 + 0.5 * len(AP_METRICS) * len(results)), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    _ap_axes(ax, results, task, errors)
    ax.set_title(title if title is not None else f"{task} AP of the final evaluation")
    return _save(fig, path)


def _grouped_bars(ax, results, keys, errors=None, fmt="{:.1f}") -> float:
    """Bars of ``results[model][key]`` grouped by key, one colour per model, each annotated;
    returns the highest bar (with its error)."""
    errors = errors or {}
    nan = float("nan")
    models = list(results)
    width = 0.8 / len(models)
    top = 0.0
    for m, model in enumerate(models):
        values = [results[model].get(k, nan) for k in keys]
        sds = [errors.get(model, {}).get(k, nan) for k in keys]
        xs = [i - 0.4 + width * (m + 0.5) for i in range(len(keys))]
        heights = [0.0 if math.isnan(v) else v for v in values]
        yerr = [0.0 if math.isnan(e) else e for e in sds]
        has_err = any(e > 0 for e in yerr)
        ax.bar(xs, heights, width * 0.95, color=f"C{m % 10}", label=model,
               yerr=yerr if has_err else None, capsize=3 if has_err else 0)  # fmt: skip
        for x, v, e in zip(xs, values, yerr):
            text = "n/a" if math.isnan(v) else fmt.format(v)
            y = (0.0 if math.isnan(v) else v) + e
            ax.annotate(text, (x, y), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize="small")  # fmt: skip
            top = max(top, y)
    ax.set_xticks(range(len(keys)))
    ax.grid(True, axis="y", alpha=0.3)
    return top


def _ap_axes(ax, results, task, errors=None):
    top = _grouped_bars(ax, results, AP_METRICS, errors)
    ax.set_xticklabels([f"{task} {k}" for k in AP_METRICS])
    ax.set_ylabel(f"{task} AP (%)")
    # room above the bars for the legend, in one row
    ax.set_ylim(0, max(top * 1.3, 1.0))
    ax.legend(fontsize="small", loc="upper center", ncol=min(3, len(results)))


def plot_comparison(rows: List[dict], path: str, title: Optional[str] = None) -> str:
    """The side-by-side comparison's figure: segm AP / APs / APm / APl per model, and each
    model's training s/iter and inference s/image (and peak memory) relative to the last row's
    model, its value printed on the bar.

    Args:
        rows: one per model, with "label", "segm" (:func:`maskpyramid.engine.runs.last_evaluation`),
            "train_s_per_iter", "inference_s", "peak_memory_mib".
    """
    if not rows:
        raise ValueError("no models to plot")
    fig = Figure(figsize=(12.0, 4.6))
    ax = fig.add_subplot(1, 2, 1)
    _ap_axes(ax, {r["label"]: r["segm"] for r in rows}, "segm")
    ax.set_title("segm AP on shapes_val")
    ax = fig.add_subplot(1, 2, 2)
    base = rows[-1]
    keys = ("train_s_per_iter", "inference_s", "peak_memory_mib")
    relative = {r["label"]: {k: r[k] / base[k] for k in keys} for r in rows}
    top = _grouped_bars(ax, relative, keys, fmt="{:.2f}x")
    ax.set_xticklabels([f"train s/iter\n({base['train_s_per_iter']:.3f} = 1)",
                        f"inference s/image\n({base['inference_s']:.3f} = 1)",
                        f"peak memory\n({base['peak_memory_mib']:.0f} MiB = 1)"])  # fmt: skip
    ax.set_ylabel(f"relative to {base['label']}")
    ax.set_ylim(0, max(top * 1.15, 1.2))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title("cost (lower is better)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
