"""A 4-trial tuning run on this machine: what a trial costs, and what ASHA saves.

Runs the real experiment (`xray_ray.tune.run_experiment`: OptunaSearch, ASHA, 2 trials at
a time, 1 CPU each, export of the best) on synthetic phantoms with the compact CNN at
64 px, and reports per trial:

- wall time: from Tune launching the trial to its last report;
- overhead: from Tune launching the trial to its first training step (the process, the
  shared data, TensorFlow's import, the model and the input pipeline, before any
  learning), split at the moment the trial function is entered;
- epochs run, and how many epochs ASHA saved by stopping trials early.

The first-step time is measured by a benchmark-only wrapper around the trial. Figures go
to reports/bench/tune.json. Numbers are on synthetic phantoms.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from common import print_table, save

from xray_ray.images import synth
from xray_ray.images.index import build_index
from xray_ray.ray_runtime import ray_session
from xray_ray.tuning.experiment import load_experiment_config, run_experiment
from xray_ray.tuning.storage import plan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune_demo.yaml"


def timed_trial(params, training, config):
    """`run_trial`, with the time the function was entered and the time of the first training batch in each report."""
    import ray.tune

    from xray_ray.training import run as train
    from xray_ray.tuning.search import run_trial

    marks = {"entered_at": time.time()}
    make_timer, report = train._epoch_timer, ray.tune.report

    def timer():
        base = make_timer()

        class FirstStep(type(base)):
            def on_train_batch_begin(self, batch, logs=None):
                marks.setdefault("first_step_at", time.time())

        return FirstStep()

    def report_with_marks(metrics, **kwargs):
        return report({**metrics, **marks}, **kwargs)

    train._epoch_timer, ray.tune.report = timer, report_with_marks
    try:
        run_trial(params, training, config)
    finally:
        train._epoch_timer, ray.tune.report = make_timer, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="max epochs per trial (ASHA rungs at 1, 2, 4, ...)")
    parser.add_argument("--per-class", type=int, default=150, help="phantoms per class (the demo's count)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("xray_ray").setLevel(logging.INFO)
    config, settings = load_experiment_config(CONFIG, [
        f"tune.num_samples={args.trials}", f"lra.epochs={args.epochs}", "tune.grace_period=1",
        "tune.reduction_factor=2", "tune.max_concurrent_trials=2", "tune.cpus_per_trial=1",
        "model.learning_rate=0.002"])  # the compact CNN's from-scratch rate (bench_train.py), so trials differ early
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth.write_dataset(root / "phantoms", per_class=args.per_class, size=64, seed=5)
        frame, _ = build_index(root / "phantoms")
        experiment = plan(settings, "bench", str(root / "tune"), root / "model", root / "reports")
        started = time.time()
        summary = run_experiment(frame, config, settings, experiment, trainable=timed_trial)
        total_s = time.time() - started
        import pandas as pd

        table = pd.read_csv(root / "reports" / "trials.csv")
        marks = {}
        for path in (root / "tune" / "bench").glob("trial_*/result.json"):
            first = json.loads(path.read_text().splitlines()[0])
            marks[first["trial_id"]] = (first["entered_at"], first["first_step_at"])
    rows = []
    for row in table.itertuples():
        entered, first_step = marks.get(row.trial_id, (float("nan"), float("nan")))
        rows.append({
            "trial": row.trial_id, "epochs": row.epochs_run, "stop": row.stop_reason,
            "wall_s": row.finished_at - row.launched_at,
            "overhead_s": first_step - row.launched_at,
            "launch_to_entry_s": entered - row.launched_at,
            "entry_to_first_step_s": first_step - entered,
            f"best_{settings.metric}": getattr(row, f"best_{settings.metric}"),
        })
    print_table(rows)
    max_epochs = args.trials * args.epochs
    run = int(table["epochs_run"].sum())
    figures = {
        "trials": rows, "max_concurrent_trials": 2, "cpus_per_trial": 1, "max_epochs_per_trial": args.epochs,
        "epochs_run": run, "epochs_without_asha": max_epochs, "epochs_saved_by_asha": summary["epochs_saved_by_asha"],
        "mean_wall_s": sum(r["wall_s"] for r in rows) / len(rows),
        "mean_overhead_s": sum(r["overhead_s"] for r in rows) / len(rows),
        "experiment_s": total_s, "timing": summary["timing"], "data": synth.SYNTHETIC_NOTE,
    }
    print(f"epochs run {run} of {max_epochs}: ASHA saved {summary['epochs_saved_by_asha']}; "
          f"experiment {total_s:.0f} s including data preparation and export ({synth.SYNTHETIC_NOTE})")
    print("saved", save("tune", figures))


if __name__ == "__main__":
    with ray_session(num_cpus=2):
        main()
