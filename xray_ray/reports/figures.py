"""Report figures: confusion matrix, errors by class, training curves, histograms, several curves on one axes.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global
backend switch, safe in Ray workers without a display. PNGs are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from xray_ray.files import atomic_path


def _save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` with Agg to a PNG at 100 dpi, atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def plot_confusion_matrix(path: str | Path, confusion, class_names: Iterable[str], title: str) -> Path:
    """Counts in each cell, coloured by the share of the true class (row) they represent."""
    counts = np.asarray(confusion, dtype=np.int64)
    names = list(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        label = f"{count}\n{shares[i, j]:.0%}" if totals[i, 0] else str(count)
        ax.text(j, i, label, ha="center", va="center", fontsize=10, color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Share of the true class")
    return _save(fig, path)


def plot_errors_by_class(path: str | Path, errors_by_class: Mapping[str, int], support: Mapping[str, int],
                         title: str) -> Path:
    """The origin's "errors by class" bar chart: misclassified images per true class, labelled with
    the count out of the class's images and the share it is."""
    names = list(errors_by_class)
    errors = np.array([errors_by_class[name] for name in names])
    totals = np.array([support.get(name, 0) for name in names])
    fig = Figure(figsize=(7, 0.6 * len(names) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(names)), errors, color="tab:red")
    for i, (wrong, total) in enumerate(zip(errors, totals)):
        share = f" ({wrong / total:.0%})" if total else ""
        ax.text(wrong, i, f" {wrong} of {total}{share}", va="center", fontsize=9)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # classes top to bottom in their usual order
    ax.set_xlim(0, max(1, errors.max(initial=0)) * 1.35)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="Misclassified images", ylabel="True class", title=title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _series(epochs: list[dict], key: str) -> np.ndarray:
    """The values of `key` across epochs as floats, NaN where missing (matplotlib leaves a gap)."""
    return np.array([np.nan if e.get(key) is None else float(e[key]) for e in epochs])


def plot_training_curves(path: str | Path, epochs: list[dict], title: str, best_epoch: int | None = None) -> Path:
    """Loss and accuracy per epoch, train vs validation; best epoch and LR cuts marked.

    `best_epoch` defaults to the last epoch flagged `improved`. A learning-rate change
    after epoch e (`lr_after != lr`) is drawn as a dotted line between e and e + 1.
    """
    if not epochs:
        raise ValueError("plot_training_curves needs at least one epoch")
    x = np.array([e["epoch"] for e in epochs], dtype=float)
    if best_epoch is None:
        best_epoch = next((e["epoch"] for e in reversed(epochs) if e.get("improved")), None)
    cuts = [(e["epoch"] + 0.5, e["lr"], e["lr_after"]) for e in epochs
            if e.get("lr_after") is not None and e.get("lr") is not None and e["lr_after"] != e["lr"]]
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    fig.suptitle(title)
    for ax, key, name in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        for prefix, label, colour in (("", "train", "tab:blue"), ("val_", "validation", "tab:orange")):
            ax.plot(x, _series(epochs, prefix + key), marker="o", markersize=3, color=colour, label=label)
        for at, _, _ in cuts:
            ax.axvline(at, color="grey", linestyle=":", linewidth=1.2)
        if cuts:  # new learning rates as tick labels above the plot, clear of the curves
            top = ax.secondary_xaxis("top")
            top.set_xticks([at for at, _, _ in cuts], [f"lr {after:.2g}" for _, _, after in cuts],
                           rotation=90, fontsize=7, color="dimgrey")
            top.tick_params(length=0)
        if best_epoch is not None and best_epoch in x:
            value = _series(epochs, "val_" + key)[list(x).index(best_epoch)]
            ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1)
            ax.plot([best_epoch], [value], marker="*", markersize=14, color="tab:green", linestyle="none")
        ax.set(xlabel="Epoch", ylabel=name, title=name, xlim=(x.min() - 0.5, x.max() + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="tab:blue", marker="o", markersize=3, label="train"),
               Line2D([], [], color="tab:orange", marker="o", markersize=3, label="validation")]
    if best_epoch is not None and best_epoch in x:
        handles.append(Line2D([], [], color="tab:green", linestyle="--", marker="*", markersize=10,
                              label=f"best epoch ({best_epoch})"))
    if cuts:
        handles.append(Line2D([], [], color="grey", linestyle=":", label="learning rate reduced"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_histograms(path: str | Path, values_by_class: Mapping[str, list[float]], title: str, xlabel: str) -> Path:
    """One small histogram per class on a shared x range; empty classes say so."""
    names = list(values_by_class) or ["(no classes)"]
    values = [np.asarray(values_by_class.get(name, []), dtype=float) for name in names]
    values = [v[np.isfinite(v)] for v in values]
    pooled = np.concatenate(values)
    unit = pooled.size == 0 or (pooled.min() >= 0 and pooled.max() <= 1)  # probabilities: bins over [0, 1]
    lo, hi = (0.0, 1.0) if unit else (pooled.min(), pooled.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows + 0.6), layout="constrained")
    fig.suptitle(title)
    for ax, name, data in zip(fig.subplots(nrows, ncols, squeeze=False).flat, names, values):
        ax.set_title(f"{name} (n={data.size})", fontsize=10)
        ax.set_xlim(bins[0], bins[-1])
        ax.set_xlabel(xlabel, fontsize=9)
        if data.size:
            ax.hist(data, bins=bins, color="tab:blue", edgecolor="white")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        else:
            ax.text(0.5, 0.5, "no images", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_yticks([])
    return _save(fig, path)


def plot_curves(path: str | Path, curves: Mapping[str, list[float]], title: str, xlabel: str, ylabel: str) -> Path:
    """Several lines on one axes (x = 1, 2, ...), e.g. one validation curve per tuning trial."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ax.plot(np.arange(1, len(ys) + 1), _series([{"y": y} for y in ys], "y"), marker="o", markersize=3, label=name)
    if not curves:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    if curves:
        ax.set_xlim(0.5, max(len(ys) for ys in curves.values()) + 0.5)
        fig.legend(loc="outside right upper", fontsize=8, ncols=1 + len(curves) // 16)
    return _save(fig, path)


def plot_reliability(path: str | Path, diagrams: Mapping[str, list[dict]], title: str) -> Path:
    """Reliability diagrams side by side (e.g. before and after calibration): accuracy against confidence per bin.

    Each diagram is a list of bins {low, high, confidence, accuracy, images}; a bar reaching
    the diagonal means answers given with that confidence were right that often.
    """
    fig = Figure(figsize=(4.2 * max(1, len(diagrams)), 4.4), layout="constrained")
    fig.suptitle(title)
    for ax, (name, bins) in zip(fig.subplots(1, max(1, len(diagrams)), squeeze=False).flat, diagrams.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        if bins:
            lows = np.array([b["low"] for b in bins])
            widths = np.array([b["high"] - b["low"] for b in bins])
            ax.bar(lows, [b["accuracy"] for b in bins], width=widths, align="edge", color="tab:blue",
                   edgecolor="white", alpha=0.8, label="accuracy in bin")
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red",
                    markersize=4, label="mean confidence in bin")
            for b in bins:
                ax.text(b["low"] + (b["high"] - b["low"]) / 2, 0.02, str(b["images"]), ha="center", fontsize=7,
                        color="white" if b["accuracy"] > 0.1 else "black")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (probability of the answer)", ylabel="accuracy",
               title=name)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_drift_trend(path: str | Path, runs: list[dict], class_names: list[str], baseline_shares: Mapping[str, float],
                     baseline_rate: float | None, title: str) -> Path:
    """Runs side by side (the last one is tonight's): each run's class mix as stacked shares next to the
    baseline's, and its out-of-distribution rate as a line against the baseline rate."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    fig.suptitle(title)
    mix, rate = fig.subplots(1, 2, width_ratios=[3, 2])
    labels = ["model card", *[run["run"] for run in runs]]
    bottom = np.zeros(len(labels))
    for name in class_names:
        shares = [baseline_shares.get(name, 0.0)]
        for run in runs:
            answered = sum(run["per_class"].values())
            shares.append(run["per_class"].get(name, 0) / answered if answered else 0.0)
        mix.bar(range(len(labels)), shares, bottom=bottom, label=name, edgecolor="white")
        bottom += np.array(shares)
    mix.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    mix.set(ylim=(0, 1), ylabel="share of answers", title="Class mix")
    mix.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    rates = [100 * run["out_of_distribution"] / run["scored"] if run["scored"] else np.nan for run in runs]
    rate.plot(range(len(runs)), rates, marker="o", color="tab:purple", label="run")
    if baseline_rate is not None:
        rate.axhline(100 * baseline_rate, color="grey", linestyle="--", linewidth=1, label="model card")
    rate.set_xticks(range(len(runs)), [run["run"] for run in runs], rotation=30, ha="right",
                    rotation_mode="anchor", fontsize=8)
    top = max([5.0, 100 * (baseline_rate or 0), *np.nan_to_num(rates)])
    rate.set(ylabel="% flagged", title="Out-of-distribution rate", ylim=(0, 1.2 * top))
    rate.legend(fontsize=7)
    rate.grid(alpha=0.3)
    return _save(fig, path)
