"""`xray-ray demo`: the whole system once, end to end, on a local Ray head of its own.

Synthesize phantoms (or take a real dataset), index them, tune through `jobs/tune.py`
submitted with `ray job submit` exactly as on a cluster, score a synthetic archive with
bad files mixed in through `jobs/score.py`, then serve the best model and ask it a few
questions over plain HTTP. One line per stage with its time; Ray's own bars in between.
Everything it started (the head, Serve) is stopped at the end, even on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from xray_ray.config import load_config
from xray_ray.config_field import setting
from xray_ray.images.index import build_index, save_index
from xray_ray.images.synth import SYNTHETIC_NOTE, write_dataset
from xray_ray.processes import free_port
from xray_ray.ray_runtime import LocalHead, ray_session
from xray_ray.reports.tables import write_json
from xray_ray.training.network import WeightsUnavailableError, resolve_weights

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = "configs/tune_demo.yaml"
REAL_CONFIG = "configs/tune_real.yaml"

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    """What the demo runs on and how big it is (the defaults are the README's `make demo`)."""

    out: Path = setting(Path("demo_output"), "Folder for everything the demo writes.")
    backbone: str | None = setting(None, "compact (learns from scratch on a CPU; the default on synthetic data) or "
                                         "efficientnetb1 (the origin's network; the default with --data).")
    data: Path | None = setting(None, "A real COVID-19 Radiography Database folder instead of synthetic phantoms "
                                      "(real-size settings: configs/tune_real.yaml).")
    per_class: int = setting(150, "Synthetic phantoms per class.")
    archive_per_class: int = setting(10, "Synthetic archive images per class to score.")
    tune_overrides: list = setting(list, "Override a tuning setting, e.g. --set tune.num_samples=2 (repeatable).")
    image_size: int = 299
    num_cpus: int = 2

    def __post_init__(self) -> None:
        self.out, self.data = Path(self.out), Path(self.data) if self.data is not None else None
        if self.backbone not in (None, "compact", "efficientnetb1"):
            raise ValueError(f"--backbone must be compact or efficientnetb1, got {self.backbone!r}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"dataset folder not found: {self.data}")
        if self.per_class < 4 or self.archive_per_class < 1:
            raise ValueError("--per-class must be at least 4 and --archive-per-class at least 1")


class DemoError(RuntimeError):
    """A stage failed; the message names it and where its output is."""


class Stages:
    """Prints `==> [i/n] what` before a stage and its duration after, and keeps the durations."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.seconds = total, 0, {}

    @contextmanager
    def __call__(self, name: str, what: str):
        self.done += 1
        print(f"==> [{self.done}/{self.total}] {what}", flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"    {name} done in {self.seconds[name]:.0f} s", flush=True)


def submit(dashboard: str, script: str, args: list[str]) -> None:
    """`ray job submit --working-dir <repo> -- python jobs/<script> ...`, its output streamed here."""
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", dashboard,
               "--working-dir", str(REPO), "--", "python", f"jobs/{script}", *args]
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise DemoError(f"`{' '.join(command[1:4])} ... jobs/{script}` failed (its output is above)")


def write_archive(folder: Path, per_class: int) -> dict[str, int]:
    """A small archive to score: fresh phantoms in class folders, and a few bad files beside them."""
    counts = write_dataset(folder, per_class=per_class, size=299, seed=2024)
    incoming = folder / "incoming"
    incoming.mkdir(exist_ok=True)
    png = next((folder / "Normal" / "images").glob("*.png")).read_bytes()
    (incoming / "empty.png").write_bytes(b"")
    (incoming / "truncated.png").write_bytes(png[: len(png) // 3])
    (incoming / "notes.png").write_bytes(b"Patient transferred to ward 4.\n")
    return {**counts, "bad": 3}


def ask_serve(url: str, files: list[Path]) -> list[dict]:
    """POST each file to /predict with a plain HTTP client; print and return the answers."""
    import httpx

    answers = []
    for path in files:
        response = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=120)
        answer = {"file": path.name, "status": response.status_code, **response.json()}
        answers.append(answer)
        if response.status_code == 200:
            marked = " [OUT OF DISTRIBUTION]" if answer.get("out_of_distribution") else ""
            print(f"    {path.name}: {answer['label']} ({answer['confidence']:.2f}){marked} from "
                  f"{answer['model_version']} on {answer['engine']}")
        else:
            print(f"    {path.name}: HTTP {response.status_code} {answer['error']}: {answer['reason']}")
    return answers


def tuning_settings(options: DemoOptions, synthetic: bool, backbone: str) -> tuple[str, list[str]]:
    """The tuning config file and the `--set` overrides the demo passes to the tune job: the
    compact CNN has no pretrained weights, so it trains from scratch."""
    overrides = [f"model.backbone={backbone}", *(["model.weights=none"] if backbone == "compact" else [])]
    return SYNTHETIC_CONFIG if synthetic else REAL_CONFIG, [*overrides, *options.tune_overrides]


def run_demo(options: DemoOptions) -> dict:
    """Run every stage; returns the headline figures and the report paths (also saved as demo_summary.json)."""
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    synthetic = options.data is None
    root = out / "phantoms" if synthetic else options.data.resolve()
    archive = out / "archive" if synthetic else root
    model, tune_reports = out / "models" / "best", out / "reports" / "tune"
    stages = Stages(total=7 if synthetic else 6)
    backbone = options.backbone or ("compact" if synthetic else "efficientnetb1")
    print(f"backbone: {backbone}" + (
        " (a small CNN: without ImageNet weights EfficientNetB1 does not learn from scratch in a CPU demo's "
        "budget, and a demo stuck at chance shows nothing; `make demo BACKBONE=efficientnetb1` runs it anyway)"
        if backbone == "compact" else ""))
    config, overrides = tuning_settings(options, synthetic, backbone)
    try:  # a missing weights file fails now, in seconds, not once the head is up and the data indexed
        resolve_weights(load_config(REPO / config, overrides).model)
    except WeightsUnavailableError as err:
        raise DemoError(str(err)) from None
    if synthetic:
        with stages("synthesize", f"synthesize {options.per_class} phantoms per class in {root}"):
            write_dataset(root, per_class=options.per_class, size=options.image_size, seed=0)
            write_archive(archive, options.archive_per_class)
    answers = _run_stages(options, stages, synthetic, root, archive, model, tune_reports, backbone, out)
    return summarize(out, tune_reports, answers, stages.seconds, synthetic)


def _run_stages(options: DemoOptions, stages: Stages, synthetic: bool, root: Path, archive: Path, model: Path,
                tune_reports: Path, backbone: str, out: Path) -> list[dict]:
    """Start the head, then index, tune, score and serve on it, all in one Ray session; Ctrl-C or SIGTERM
    at any point stops everything started (the session's way out), timed as the last stage."""
    head = LocalHead(num_cpus=options.num_cpus)
    with ExitStack() as session:
        try:
            with stages("start_ray", "start a local Ray head (127.0.0.1, token auth, dashboard and job API included)"):
                session.enter_context(ray_session(head=head, log_to_driver=False))
                print(f"    Ray at {head.gcs}; dashboard and job API: {head.dashboard}; token file: {head.token_file}")
            with stages("index", f"index {root} on Ray Data"):
                frame, _ = build_index(root)
                save_index(frame, out / "index.parquet")
                print(f"    {len(frame)} files, {int((~frame['readable']).sum())} unreadable")
            config, overrides = tuning_settings(options, synthetic, backbone)
            with stages("tune", f"tune with `ray job submit ... jobs/tune.py --config {config}`"):
                submit(head.dashboard, "tune.py", [
                    "--config", config, *[arg for o in overrides for arg in ("--set", o)],
                    "--index", str(out / "index.parquet"), "--name", "demo", "--storage-path",
                    str(out / "tune_results"), "--out", str(model), "--report-dir", str(tune_reports), "--overwrite"])
            with stages("score", f"score the archive {archive} with `ray job submit ... jobs/score.py`"):
                submit(head.dashboard, "score.py", ["--archive", str(archive), "--model", str(model),
                                                    "--out", str(out / "scores"), "--run", "demo"])
            with stages("serve", "serve the best model with Ray Serve and ask it over HTTP"):
                answers = serve_and_ask(model, archive)
        finally:
            with stages("stop", "stop what the demo started"):
                session.close()
    return answers


def serve_and_ask(model: Path, archive: Path) -> list[dict]:
    """Serve `model` on a free loopback port, ask it about one image per class and a bad file, stop Serve."""
    from ray import serve

    from xray_ray.config_services import ServeConfig
    from xray_ray.serving.app import start as start_serving

    port = free_port()
    start_serving(ServeConfig(model=str(model), num_cpus=1, port=port))
    print(f"    review page (open it in a browser while Serve is up): http://127.0.0.1:{port}/", flush=True)
    images = sorted(archive.glob("*/images/*.png")) or sorted(archive.glob("*/*.png"))  # either layout
    samples = images[:: max(1, len(images) // 4)][:4]  # one per class folder
    answers = ask_serve(f"http://127.0.0.1:{port}", samples + sorted((archive / "incoming").glob("*"))[:1])
    serve.shutdown()
    return answers


def summarize(out: Path, tune_reports: Path, answers: list[dict], seconds: dict, synthetic: bool) -> dict:
    """Headline numbers and report paths, printed and saved as demo_summary.json."""
    tuned = json.loads((tune_reports / "summary.json").read_text())
    scored = json.loads((out / "scores" / "demo" / "report" / "summary.json").read_text())
    summary = {
        "data": SYNTHETIC_NOTE if synthetic else "real dataset",
        "reports": {"tuning (trials, best model, test set)": str(tune_reports / "index.html"),
                    "archive scoring (per class, review list, errors)": str(out / "scores/demo/report/index.html")},
        "best_trial": tuned["best_trial"], "best_trial_number": tuned["best_trial_number"],
        "best_params": tuned["best_params"], "best_score": {tuned["metric"]: tuned["best_score"]},
        "epochs_run": tuned["epochs_run"], "test_accuracy": tuned["test_accuracy"],
        "model_version": tuned["model_version"],
        "archive": {k: scored.get(k) for k in ("scored", "errors", "per_class")},
        "archive_accuracy": (scored.get("ground_truth") or {}).get("accuracy"),
        "serve_answers": [{k: a.get(k) for k in ("file", "status", "label", "confidence", "out_of_distribution", "reason")} for a in answers],
        "seconds": seconds,
    }
    write_json(out / "demo_summary.json", summary)
    label = "SYNTHETIC" if synthetic else "real data"
    print(f"\nReports ({summary['data']}):")
    for what, path in summary["reports"].items():
        print(f"  {what}: {path}")
    # Tune draws trial ids at random; the trial's number (its place in the search's order) is what repeats.
    print(f"Headline ({label}): best trial #{tuned['best_trial_number']} of {tuned['trials']} "
          f"(id {tuned['best_trial']}) {tuned['metric']} {tuned['best_score']:.3f}; "
          f"test accuracy {tuned['test_accuracy']:.3f}; archive: {scored.get('scored')} scored, "
          f"{scored.get('errors')} unreadable" + (f", accuracy {summary['archive_accuracy']:.3f}"
                                                   if summary["archive_accuracy"] is not None else "")
          + f"; Serve answered {sum(a['status'] == 200 for a in answers)} of {len(answers)} requests")
    print(f"Total {sum(seconds.values()) / 60:.1f} min; summary in {out / 'demo_summary.json'}")
    return summary
