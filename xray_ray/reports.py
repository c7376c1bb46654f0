"""Report writing shared by training, tuning and nightly scoring: JSON, CSV, plots, HTML.

Every file is written atomically (`xray_ray.files`), so a crashed job never leaves a
half-written report. Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg
canvas: no pyplot, no global backend switch, safe in Ray workers without a display.
HTML pages are self-contained (inline CSS, images and links by relative path only), so a
report folder can be moved or zipped and still opens offline.
"""

from __future__ import annotations

import html
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from xray_ray.evaluate import Evaluation
from xray_ray.files import atomic_path, atomic_write_text

# --------------------------------------------------------------------------- data files


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy values become Python ones, Paths strings, NaN/inf null."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj) if isinstance(obj, Path) else obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented, strictly valid JSON."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def _frame(frame_or_rows: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """A DataFrame whose index is kept (as columns) only if it is named."""
    frame = frame_or_rows if isinstance(frame_or_rows, pd.DataFrame) else pd.DataFrame(list(frame_or_rows))
    named = any(name is not None for name in frame.index.names)
    return frame.reset_index() if named else frame.reset_index(drop=True)


def write_csv(path: str | Path, frame_or_rows: pd.DataFrame | Iterable[Mapping]) -> Path:
    """Write a DataFrame or a list of dicts as CSV (an unnamed index is not written)."""
    atomic_write_text(path, _frame(frame_or_rows).to_csv(index=False))
    return Path(path)


def write_classification_report(folder: str | Path, evaluation: Evaluation) -> dict[str, Path]:
    """Write classification_report.txt, .csv (per class + averages) and .json (as_dict)."""
    folder = Path(folder)
    paths = {ext: folder / f"classification_report.{ext}" for ext in ("txt", "csv", "json")}
    atomic_write_text(paths["txt"], evaluation.report_text())
    write_csv(paths["csv"], evaluation.report_rows())
    write_json(paths["json"], evaluation.as_dict())
    return paths


# --------------------------------------------------------------------------- figures


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


# --------------------------------------------------------------------------- HTML pages


@dataclass
class Text:
    """A paragraph (a plain `str` block means the same)."""

    text: str


@dataclass
class Metrics:
    """Key numbers shown large, label -> value, e.g. {"Accuracy": "93.8%"}."""

    items: Mapping[str, Any]


@dataclass
class KeyValues:
    """A two-column table of facts or settings, key -> value."""

    items: Mapping[str, Any]


@dataclass
class Table:
    """Rows (DataFrame or list of dicts); past `max_rows` a line points to `full_file`."""

    rows: pd.DataFrame | list[dict]
    max_rows: int | None = None
    full_file: str | None = None


@dataclass
class Image:
    """A PNG beside the page (relative path), with alt text and an optional caption."""

    src: str
    alt: str
    caption: str | None = None


@dataclass
class Links:
    """A list of links to files beside the page, label -> relative href."""

    links: Mapping[str, str]


@dataclass
class Section:
    """A heading and its blocks, in order: str, Text, Metrics, KeyValues, Table, Image, Links."""

    heading: str
    blocks: list = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#1f2933;
 max-width:980px;margin:2rem auto;padding:0 1rem;line-height:1.5}
h1{font-size:1.8rem;margin-bottom:.5rem}h2{border-bottom:2px solid #d9e2ec;padding-bottom:.2rem;margin-top:2.2rem}
.note{background:#fff4d6;border:2px solid #e0a800;border-radius:6px;padding:.6rem 1rem;font-weight:600}
.note p{margin:.2rem 0}.metrics{display:flex;flex-wrap:wrap;gap:1rem;margin:1rem 0}
.metric{background:#f0f4f8;border-radius:8px;padding:.8rem 1.2rem;min-width:9rem}
.metric .value{font-size:2.2rem;font-weight:700;color:#102a43}.metric .label{color:#52606d}
table{border-collapse:collapse;margin:.8rem 0}th,td{border:1px solid #d9e2ec;padding:.3rem .7rem;text-align:left}
thead th{background:#f0f4f8}tbody tr:nth-child(even){background:#fafbfc}td.num{text-align:right}
table.kv th{background:#f8fafc;font-weight:600;font-family:ui-monospace,monospace;font-size:.9rem}
figure{margin:1rem 0}img{max-width:100%;height:auto;border:1px solid #d9e2ec}
figcaption,.more,footer{color:#52606d;font-size:.9rem}footer{margin-top:3rem}
"""


def _fmt(value: Any) -> str:
    """A short human-readable form of a cell value (floats to 4 significant digits)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _href(ref: str | Path) -> str:
    """An escaped, URL-quoted relative reference; absolute paths and URLs are refused."""
    ref = ref.as_posix() if isinstance(ref, Path) else str(ref)
    parts = urllib.parse.urlsplit(ref)
    if parts.scheme or parts.netloc or ref.startswith(("/", "\\")):
        raise ValueError(f"reports link only to files beside them (relative paths), got {ref!r}")
    return html.escape(urllib.parse.quote(ref, safe="/#"))


_NUMERIC = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?%?")


def _cell(text: str) -> str:
    """A table cell; cells that look like numbers are right-aligned."""
    align = ' class="num"' if _NUMERIC.fullmatch(text) else ""
    return f"<td{align}>{html.escape(text)}</td>"


def _table(block: Table) -> str:
    frame = _frame(block.rows)
    shown = frame if block.max_rows is None else frame.head(block.max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(_fmt(v)) for v in row) + "</tr>" for row in shown.itertuples(index=False))
    out = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if hidden := len(frame) - len(shown):
        where = f' in <a href="{_href(block.full_file)}">{html.escape(block.full_file)}</a>' if block.full_file else " not shown"
        out += f'<p class="more">{hidden} more rows{where}</p>'
    return out


def _block(block: Any) -> str:
    """The HTML of one block; every piece of text is escaped."""
    e = html.escape
    match block:
        case str() | Text():
            return f"<p>{e(block if isinstance(block, str) else block.text)}</p>"
        case Metrics(items):
            tiles = "".join(f'<div class="metric"><div class="value">{e(_fmt(v))}</div>'
                            f'<div class="label">{e(str(k))}</div></div>' for k, v in items.items())
            return f'<div class="metrics">{tiles}</div>'
        case KeyValues(items):
            rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>" for k, v in items.items())
            return f'<table class="kv"><tbody>{rows}</tbody></table>'
        case Table():
            return _table(block)
        case Image(src, alt, caption):
            cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
            return f'<figure><img src="{_href(src)}" alt="{e(alt)}">{cap}</figure>'
        case Links(links):
            items = "".join(f'<li><a href="{_href(href)}">{e(label)}</a></li>' for label, href in links.items())
            return f"<ul>{items}</ul>"
    raise TypeError(f"unknown report block {type(block).__name__}; use Text, Metrics, KeyValues, Table, Image or Links")


def write_html(path: str | Path, title: str, sections: list[Section], note: str | list[str] | None = None) -> Path:
    """Write one self-contained page: title, the note(s) in a banner, then each section."""
    notes = [note] if isinstance(note, str) else list(note or [])
    banner = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="note" role="note">{banner}</div>' if notes else "",
    ]
    for section in sections:
        blocks = "\n".join(_block(b) for b in section.blocks)
        parts.append(f"<section><h2>{html.escape(section.heading)}</h2>\n{blocks}</section>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<footer>Generated {stamp} by xray_ray.</footer></body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


# --------------------------------------------------------------------------- training report


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"data": {"seed": 1}} -> {"data.seed": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def class_rows(evaluation: Evaluation) -> list[dict]:
    """Per-class rows in plain words; a rate with nothing to count shows as a dash."""
    cm = evaluation.confusion
    rows = []
    for i, name in enumerate(evaluation.class_names):
        entry, total, predicted = evaluation.report[name], int(cm[i].sum()), int(cm[:, i].sum())
        rows.append({
            "Class": name, "Images": total, "Correct": int(cm[i, i]), "Missed": total - int(cm[i, i]),
            "Recall (sensitivity)": f"{entry['recall']:.1%}" if total else "–",
            "Precision": f"{entry['precision']:.1%}" if predicted else "–",
            "F1 score": f"{entry['f1-score']:.2f}" if total or predicted else "–",
        })
    return rows


def write_training_report(folder: str | Path, *, title: str, evaluation: Evaluation, epochs: list[dict],
                          best_epoch: int | None, config: Mapping, note: str | list[str] | None = None,
                          extra: Mapping | None = None) -> Path:
    """Write the report folder of one training run; `extra` adds a "Run details" table."""
    folder = Path(folder)
    files = write_classification_report(folder, evaluation)
    plot_confusion_matrix(folder / "confusion_matrix.png", evaluation.confusion, evaluation.class_names,
                          f"Confusion matrix ({evaluation.n} images)")
    plot_training_curves(folder / "training_curves.png", epochs, "Training progress", best_epoch)
    correct = int(np.trace(evaluation.confusion))
    sections = [
        Section("Summary", [
            Metrics({"Accuracy": f"{evaluation.accuracy:.1%}",
                     "Mean F1 over classes": f"{evaluation.report['macro avg']['f1-score']:.2f}",
                     "Images evaluated": evaluation.n,
                     "Best epoch": f"{best_epoch} of {len(epochs)}" if best_epoch is not None else "–"}),
            Text(f"The model assigned the true class to {correct} of the {evaluation.n} images evaluated."),
        ]),
        Section("Results by class", [
            Table(class_rows(evaluation)),
            Text("Recall (sensitivity): of the images truly in a class, the share the model found. "
                 "Precision: of the images the model put in a class, the share that truly belong there. "
                 "F1 combines the two (1.00 is perfect)."),
        ]),
        Section("Confusion matrix", [
            Image("confusion_matrix.png", "Confusion matrix of true against predicted classes",
                  "Rows are the true class, columns the model's answer; the diagonal holds the correct answers. "
                  "Colour shows the share of each true class."),
        ]),
        Section("Training progress", [
            Image("training_curves.png", "Loss and accuracy per epoch, training and validation",
                  "The green line and star mark the best epoch (the weights kept); "
                  "dotted lines mark learning-rate reductions."),
        ]),
    ]
    if extra:
        sections.append(Section("Run details", [KeyValues(_flatten(extra))]))
    sections.append(Section("Configuration", [KeyValues(_flatten(config))]))
    sections.append(Section("Files", [Links({
        "Classification report (text)": files["txt"].name, "Classification report (CSV)": files["csv"].name,
        "Classification report (JSON)": files["json"].name, "Confusion matrix (PNG)": "confusion_matrix.png",
        "Training curves (PNG)": "training_curves.png"})]))
    return write_html(folder / "index.html", title, sections, note)
