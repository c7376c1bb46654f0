"""A model registry in a folder (a shared volume on a cluster): promoted models, the current one, and history.

No server: a folder every service can read.

    REG/models/<version>/   a copy of each promoted model folder, written as one unit
    REG/current.json        which model is current: {"version", "folder", "since"}, replaced atomically
    REG/history.jsonl       one line per promotion or rollback: when, from which version to which,
                            the figures compared, forced or not, and the reason

`promote` copies a candidate in only through the gate: it loads as a `Classifier` (digests, a
usable ONNX export, an out-of-distribution detector in the current layout, and its golden set
reproduced), has the card's classes, and, unless forced, matches the current model's input size
and test split (the same index fingerprint) and is no worse on accuracy, macro F1 and ECE than
`Margins` allow. A refusal names the failed check and changes nothing. `rollback` goes back one
step of the promotions still standing, through the same golden-set check. Serve (watching
`current.json`) and scoring (`--registry`) follow the pointer. Writers take `REG/.lock`, so two
promotions never interleave.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from xray_ray.files import atomic_folder, atomic_write_text
from xray_ray.model_folder.card import ModelCard
from xray_ray.model_folder.classifier import Classifier, load_detector
from xray_ray.model_folder.golden import missing_reason

CURRENT_FILE = "current.json"
HISTORY_FILE = "history.jsonl"
MODELS_FOLDER = "models"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Margins:
    """How much worse than the current model a candidate may be on the same test split and still be promoted."""

    accuracy: float = 0.01
    macro_f1: float = 0.01
    ece: float = 0.02


class PromotionRefused(ValueError):
    """The gate refused a candidate (or a rollback): `check` names the failed check, the message says why."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"refused ({check}): {message}")
        self.check = check


def figures(card: ModelCard) -> dict:
    """The figures the gate compares, from the card's test split: accuracy, macro F1 and calibrated ECE."""
    test = (card.get("metrics") or {}).get("test") or {}
    calibration = ((card.get("calibration") or {}).get("test") or {}).get("after") or {}
    macro = (test.get("report") or {}).get("macro avg") or {}
    return {"accuracy": test.get("accuracy"), "macro_f1": macro.get("f1-score"), "ece": calibration.get("ece"),
            "test_images": test.get("n")}


def current_version(registry: str | Path) -> str | None:
    """The current model's version, None for an empty registry (cheap: what Serve polls)."""
    path = Path(registry) / CURRENT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["version"]


def current_folder(registry: str | Path) -> Path:
    """The current model's folder; FileNotFoundError naming the registry when nothing was promoted yet."""
    path = Path(registry) / CURRENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the registry {registry} has no current model: promote one first "
                                "(xray-ray promote --model DIR --registry REG)")
    return Path(registry) / json.loads(path.read_text())["folder"]


def history(registry: str | Path) -> list[dict]:
    """Every promotion and rollback, oldest first."""
    path = Path(registry) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def standing(events: list[dict]) -> list[str]:
    """The versions promoted and not rolled back, oldest first: the last is current, the one before it is
    where a rollback goes."""
    stack: list[str] = []
    for event in events:
        if event["action"] == "rollback":
            stack.pop()
        else:
            stack.append(event["to"])
    return stack


def loads_and_answers(folder: Path) -> Classifier:
    """The checks no promotion or rollback skips: the card, file digests, a usable ONNX export, a detector in
    this version's layout, and the golden set reproduced on ONNX Runtime. PromotionRefused names the one failing."""
    checks = (("model card", lambda: ModelCard.read(folder)),
              ("onnx export", lambda: ModelCard.read(folder).choose_engine("onnxruntime")),
              ("ood detector", lambda: _detector_present(ModelCard.read(folder))),
              ("golden set", lambda: _golden_present(ModelCard.read(folder))),
              ("golden set", lambda: Classifier(folder, engine="onnxruntime")))
    loaded = None
    for name, run in checks:
        try:
            loaded = run()
        except Exception as err:  # whatever the folder's fault, it is this check's refusal
            raise PromotionRefused(name, f"{folder}: {err}") from None
    return loaded


def _detector_present(card: ModelCard) -> None:
    if load_detector(card)[1] is None:
        raise ValueError("the card has no out-of-distribution detector: refit it (xray-ray refit)")


def _golden_present(card: ModelCard) -> None:
    if reason := missing_reason(card):
        raise ValueError(reason)


def compare(candidate: ModelCard, current: ModelCard, margins: Margins) -> dict:
    """The gate's comparison of a candidate with the current model; PromotionRefused naming the figure."""
    if candidate.image_size != current.image_size:
        raise PromotionRefused("input size", f"the candidate takes {candidate.image_size} px inputs, the current "
                                             f"model {current.image_size} px")
    if candidate.get("index_fingerprint") != current.get("index_fingerprint"):
        raise PromotionRefused("test split", "the candidate was evaluated on another index (fingerprint "
                               f"{str(candidate.get('index_fingerprint'))[:12]}, current "
                               f"{str(current.get('index_fingerprint'))[:12]}): its figures are not comparable")
    new, old = figures(candidate), figures(current)
    for name in ("accuracy", "macro_f1", "ece"):
        if new[name] is None or old[name] is None:
            raise PromotionRefused(name, f"the {'candidate' if new[name] is None else 'current model'}'s card has "
                                         f"no test {name}")
    losses = {"accuracy": old["accuracy"] - new["accuracy"], "macro_f1": old["macro_f1"] - new["macro_f1"],
              "ece": new["ece"] - old["ece"]}  # lower ECE is better
    for name, worse in losses.items():
        if worse > getattr(margins, name):
            raise PromotionRefused(name, f"test {name} {new[name]:.4f} against the current {old[name]:.4f}: worse by "
                                         f"{worse:.4f}, more than the margin {getattr(margins, name)}")
    return {"candidate": new, "current": old, "margins": asdict(margins)}


@contextmanager
def _locked(registry: Path) -> Iterator[None]:
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record(registry: Path, event: dict) -> dict:
    """Point `current.json` at the event's target, then append the event to the history (both atomic)."""
    folder = f"{MODELS_FOLDER}/{event['to']}"
    atomic_write_text(registry / CURRENT_FILE, json.dumps({"version": event["to"], "folder": folder,
                                                           "since": event["at"]}) + "\n")
    lines = [json.dumps(past) for past in history(registry)] + [json.dumps(event)]
    atomic_write_text(registry / HISTORY_FILE, "\n".join(lines) + "\n")
    return event


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promote(registry: str | Path, model: str | Path, force: bool = False, reason: str = "",
            margins: Margins = Margins()) -> dict:
    """Make `model` the registry's current model through the gate; returns the history event.

    The first promotion into an empty registry has nothing to compare with; `force` skips the
    comparison (recorded as forced), never the checks of `loads_and_answers`."""
    registry, model = Path(registry), Path(model)
    candidate = loads_and_answers(model).card
    with _locked(registry):
        events = history(registry)
        now = standing(events)
        if now and now[-1] == candidate.version:
            raise PromotionRefused("version", f"{candidate.version} is already the current model")
        current = ModelCard.read(current_folder(registry)) if now else None
        compared = compare(candidate, current, margins) if current is not None and not force else None
        target = registry / MODELS_FOLDER / candidate.version
        if not target.exists():
            with atomic_folder(target) as staging:
                shutil.copytree(model, staging, dirs_exist_ok=True)
            loads_and_answers(target)  # the copy, as Serve will load it
        return _record(registry, {"at": _now(), "action": "promote", "from": current.version if current else None,
                                  "to": candidate.version, "forced": bool(force and current is not None),
                                  "figures": compared or {"candidate": figures(candidate)}, "reason": reason})


def rollback(registry: str | Path, reason: str = "") -> dict:
    """Go back one step: the model promoted before the current one becomes current again, after its golden set
    is reproduced; returns the history event. PromotionRefused when there is no earlier model."""
    registry = Path(registry)
    with _locked(registry):
        now = standing(history(registry))
        if len(now) < 2:
            raise PromotionRefused("history", f"the registry {registry} has no earlier model to go back to")
        previous = loads_and_answers(registry / MODELS_FOLDER / now[-2]).card
        return _record(registry, {"at": _now(), "action": "rollback", "from": now[-1], "to": previous.version,
                                  "forced": False, "figures": {"candidate": figures(previous)}, "reason": reason})
