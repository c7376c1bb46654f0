"""The one page skeleton of every report: a title, a banner of notes, then sections of blocks.

Pages are self-contained (inline CSS, images and links by relative path only), so a
report folder can be moved or zipped and still opens offline. Every piece of text is
escaped; a link that is not a relative path is refused.
"""

from __future__ import annotations

import html
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from xray_ray.files import atomic_write_text
from xray_ray.reports.tables import frame_of


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
class Card:
    """Pictures beside the page shown side by side, e.g. a thumbnail and its heat map: (relative src, alt) pairs,
    and a caption (one line per line of text)."""

    pictures: list[tuple[str, str]]
    caption: str


@dataclass
class Gallery:
    """A grid of cards; each picture links to itself at full size."""

    cards: list[Card]


@dataclass
class Section:
    """A heading and its blocks, in order: str, Text, Metrics, KeyValues, Table, Image, Links, Gallery."""

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
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.8rem;margin:1rem 0}
.card{margin:0;border:1px solid #d9e2ec;border-radius:6px;padding:.4rem}.card .pictures{display:flex;gap:.3rem}
.card .pictures a{flex:1 1 0;min-width:0}.card img{width:100%;max-width:256px}
.card figcaption{margin-top:.3rem;overflow-wrap:anywhere}
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
    frame = frame_of(block.rows)
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
        case Gallery(cards):
            shown = "".join(
                '<figure class="card"><div class="pictures">'
                + "".join(f'<a href="{_href(src)}"><img src="{_href(src)}" alt="{e(alt)}"></a>' for src, alt in card.pictures)
                + f'</div><figcaption>{"<br>".join(e(line) for line in card.caption.splitlines())}</figcaption></figure>'
                for card in cards)
            return f'<div class="gallery">{shown}</div>'
        case Links(links):
            items = "".join(f'<li><a href="{_href(href)}">{e(label)}</a></li>' for label, href in links.items())
            return f"<ul>{items}</ul>"
    raise TypeError(f"unknown report block {type(block).__name__}; use Text, Metrics, KeyValues, Table, Image, Links or Gallery")


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
