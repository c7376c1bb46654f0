"""Report files: JSON, CSV, PNG figures and self-contained HTML, all written atomically."""

import json
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from xray_ray.config import CLASS_NAMES
from xray_ray.reports.figures import plot_curves, plot_histograms, plot_training_curves
from xray_ray.reports.html import (
    Card,
    Gallery,
    Image,
    KeyValues,
    Links,
    Metrics,
    Section,
    Table,
    Text,
    write_html,
)
from xray_ray.reports.metrics import evaluate
from xray_ray.reports.tables import write_csv, write_json
from xray_ray.reports.training import write_training_report


def make_epochs(n, cuts=()):
    """Per-epoch dicts as training writes them; the learning rate halves after each epoch in `cuts`."""
    epochs, lr = [], 1e-3
    for e in range(1, n + 1):
        after = lr / 2 if e in cuts else lr
        epochs.append(dict(epoch=e, loss=1 / e, accuracy=1 - 0.5 / e, val_loss=1.2 / e, val_accuracy=1 - 0.6 / e,
                           lr=lr, lr_after=after, improved=e <= max(1, n - 2)))
        lr = after
    return epochs


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(0)
    labels = list(rng.choice(CLASS_NAMES[:3], size=40))  # "Viral Pneumonia" absent: an empty confusion row
    probs = rng.dirichlet(np.ones(4), size=40)
    probs[np.arange(40), [CLASS_NAMES.index(label) for label in labels]] += 0.5
    return evaluate(labels, probs / probs.sum(axis=1, keepdims=True))


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.refs += [value for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def parse_html(path):
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.refs, "".join(parser.text)


def assert_png(path, min_width=300):
    with PILImage.open(path) as image:
        assert image.format == "PNG"
        assert image.width > min_width and image.height > 200


def assert_no_temp_files(folder):
    leftovers = [p.name for p in Path(folder).rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_training_report_writes_every_file(tmp_path, evaluation):
    config = {"data": {"image_size": 240, "split": [0.9, 0.05, 0.05]}, "train": {"lr": 1e-3, "epochs": 6}}
    index = write_training_report(
        tmp_path / "run", title="Training <report>", evaluation=evaluation, epochs=make_epochs(6, cuts=(3,)),
        best_epoch=4, config=config, note=["synthetic phantoms, not real X-rays", "research use only"],
        extra={"dataset": {"images": 40}},
    )
    folder = tmp_path / "run"
    assert index == folder / "index.html"
    names = {p.name for p in folder.iterdir()}
    assert names == {"index.html", "confusion_matrix.png", "training_curves.png", "errors_by_class.png",
                     "classification_report.txt", "classification_report.csv", "classification_report.json"}
    assert json.loads((folder / "classification_report.json").read_text()) == json.loads(json.dumps(evaluation.as_dict()))
    table = pd.read_csv(folder / "classification_report.csv")
    assert list(table["label"]) == [*CLASS_NAMES, "macro avg", "weighted avg"]
    assert list(table.columns) == ["label", "precision", "recall", "f1-score", "support"]
    assert "Accuracy:" in (folder / "classification_report.txt").read_text()
    assert_png(folder / "confusion_matrix.png")
    assert_png(folder / "training_curves.png", min_width=800)
    assert_png(folder / "errors_by_class.png")

    html_text = index.read_text(encoding="utf-8")
    refs, text = parse_html(index)
    for heading in ("Summary", "Results by class", "Confusion matrix", "Errors by class", "Training progress", "Run details",
                    "Configuration", "Files", "Training <report>", "synthetic phantoms, not real X-rays"):
        assert heading in text
    assert "<report>" not in html_text  # the title is escaped
    assert "data.image_size" in text and "train.lr" in text and "dataset.images" in text
    assert f"{evaluation.accuracy:.1%}" in text
    assert refs and "http" not in html_text
    for ref in refs:
        assert not urllib.parse.urlsplit(ref).scheme and not ref.startswith("/")
        assert (folder / urllib.parse.unquote(ref)).is_file(), ref
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("rows_as", ["frame", "dicts"])
def test_html_escapes_everything_and_caps_rows(tmp_path, rows_as):
    rows = [{"file": "<script>alert(1)</script>", "score": 0.5}] + [{"file": f"img{i}.png", "score": i} for i in range(9)]
    table = pd.DataFrame(rows) if rows_as == "frame" else rows
    (tmp_path / "all rows.csv").write_text("x")
    (tmp_path / "fig.png").write_bytes(b"")
    sections = [
        Section("Scores & <b>flags</b>", [
            "plain <i>paragraph</i>", Text("a & b"), Metrics({"Accuracy": "91.0%"}), KeyValues({"<k>": "<v>"}),
            Table(table, max_rows=3, full_file="all rows.csv"), Image("fig.png", 'alt "quoted"'),
            Links({"All <rows>": "all rows.csv"}),
        ]),
    ]
    path = write_html(tmp_path / "page.html", "Nightly <scoring>", sections, note="research use only")
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for raw in ("<b>flags", "<i>paragraph", "<k>", "<v>", "<rows>", "<scoring>"):
        assert raw not in page
    refs, text = parse_html(path)
    assert "7 more rows in all rows.csv" in text
    assert "img1.png" in text and "img2.png" not in text
    assert "research use only" in text and "91.0%" in text
    assert sorted(set(refs)) == ["all%20rows.csv", "fig.png"]
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("ref", ["https://cdn.example.com/x.png", "/etc/passwd", "file:///tmp/x.png", "//host/x.png"])
def test_html_refuses_non_relative_references(tmp_path, ref):
    with pytest.raises(ValueError, match="relative"):
        write_html(tmp_path / "page.html", "t", [Section("s", [Image(ref, "x")])])
    with pytest.raises(ValueError, match="relative"):
        write_html(tmp_path / "page.html", "t", [Section("s", [Links({"x": ref})])])
    assert not (tmp_path / "page.html").exists()


def test_html_rejects_unknown_blocks(tmp_path):
    with pytest.raises(TypeError, match="unknown report block"):
        write_html(tmp_path / "page.html", "t", [Section("s", [42])])


@pytest.mark.parametrize(
    "epochs, best",
    [
        (make_epochs(1), 1),
        (make_epochs(12, cuts=(4, 5, 9)), None),  # best epoch taken from the `improved` flags
        ([{"epoch": 0, "loss": 1.0, "accuracy": 0.3, "val_loss": None}], 0),  # no validation, no lr
    ],
)
def test_training_curves(tmp_path, epochs, best):
    path = plot_training_curves(tmp_path / "curves.png", epochs, "Training", best_epoch=best)
    assert_png(path, min_width=800)
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "values",
    [
        {"COVID": [0.9, 0.8], "Lung_Opacity": [], "Normal": [0.4], "Viral Pneumonia": [0.99] * 5},
        {"only": [3.0, 7.5, 12.0, float("nan")], "same": [5.0], "empty": []},  # outside [0, 1]
        {},
    ],
)
def test_histograms(tmp_path, values):
    assert_png(plot_histograms(tmp_path / "hist.png", values, "Confidence", "confidence"))


@pytest.mark.parametrize(
    "curves",
    [
        {**{f"trial {i}": list(np.linspace(0.3, 0.9 - i / 20, 3 + i)) for i in range(5)},
         "single point": [0.5], "with gap": [0.2, float("nan"), 0.6]},
        {},
    ],
)
def test_curves(tmp_path, curves):
    assert_png(plot_curves(tmp_path / "curves.png", curves, "Tuning", "epoch", "val accuracy"))


def test_write_json_makes_numpy_and_nan_valid(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": Path("x/y"), 1: (np.int64(2),)}
    path = write_json(tmp_path / "sub" / "x.json", obj)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": "x/y", "1": [2]}
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "data, columns",
    [
        ([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], ["a", "b"]),
        (pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), ["a", "b"]),
        (pd.DataFrame({"b": ["x", "y"]}, index=pd.Index([1, 2], name="a")), ["a", "b"]),
    ],
)
def test_write_csv(tmp_path, data, columns):
    frame = pd.read_csv(write_csv(tmp_path / "t.csv", data))
    assert list(frame.columns) == columns and list(frame["a"]) == [1, 2]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert_no_temp_files(tmp_path)


def test_gallery_escapes_captions_and_links_pictures_relatively(tmp_path):
    cards = [Card([("explain/ab.png", 'thumb "<x>"'), ("explain/ab-gradcam.png", "heat")], "a <b>\nCOVID, 0.91")]
    path = write_html(tmp_path / "page.html", "t", [Section("s", [Gallery(cards)])])
    page = path.read_text(encoding="utf-8")
    assert "a &lt;b&gt;<br>COVID, 0.91" in page and "<b>" not in page and 'alt="thumb &quot;&lt;x&gt;&quot;"' in page
    refs, _ = parse_html(path)
    assert sorted(set(refs)) == ["explain/ab-gradcam.png", "explain/ab.png"]
    with pytest.raises(ValueError, match="relative"):
        write_html(tmp_path / "bad.html", "t", [Section("s", [Gallery([Card([("/etc/x.png", "x")], "c")])])])
