"""`xray-ray train`, `evaluate`, `refit`, `tune`, `promote` and `rollback`: making, judging and releasing models.

`train` and `tune` run inside one Ray session (Ray Data prepares their data, Tune runs the
trials); `evaluate`, `refit` and the registry's commands need no Ray (pandas splits, ONNX
Runtime) and start none."""

from __future__ import annotations

from pathlib import Path

import typer

from xray_ray.cli.app import (
    ADDRESS_OPTION,
    CONFIG_OPTION,
    SET_OPTION,
    app,
    fail,
    read_config,
    settings_options,
    read_index,
    synthetic_note,
)
from xray_ray.config_training import TuneConfig
from xray_ray.ray_runtime import ray_session


@app.command()
def train(
    index_path: Path = typer.Option(..., "--index", help="index.parquet written by `xray-ray index`."),
    out: Path = typer.Option(..., help="Model folder to export, e.g. models/NAME."),
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    report_dir: Path = typer.Option(None, help="Report folder (default reports/train/<model name>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing model folder."),
    address: str = ADDRESS_OPTION,
) -> None:
    """Train one model with LRA, export it with its model card, evaluate it on valid and test."""
    from xray_ray.training.network import WeightsUnavailableError
    from xray_ray.training.run import train_and_export

    config = read_config(config_file, overrides)
    frame = read_index(index_path)
    try:
        with ray_session(address):  # Ray Data splits and undersamples the index
            card = train_and_export(frame, config, out, report_dir or Path("reports/train") / out.name, overwrite)
    except (FileExistsError, WeightsUnavailableError, ValueError) as err:
        raise fail(str(err))
    test = card["metrics"]["test"]
    typer.echo(f"model {card['version']} ({card['backbone']}) exported to {out}")
    typer.echo(f"test accuracy {test['accuracy']:.3f} on {test['n']} images{synthetic_note(card['synthetic_data'])}")
    typer.echo(f"report: {card['report']}")


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="Exported model folder."),
    index_path: Path = typer.Option(..., "--index", help="index.parquet to evaluate on."),
    split: str = typer.Option("test", help="train, valid, test, or all (every readable row)."),
    report_dir: Path = typer.Option(None, help="Report folder (default reports/evaluate/<model>-<split>)."),
) -> None:
    """Evaluate an exported model on a split of an index (the split the model card's seed defines)."""
    from xray_ray.training.evaluate import evaluate_model

    frame = read_index(index_path)
    folder = report_dir or Path("reports/evaluate") / f"{model.name}-{split}"
    try:
        evaluation, card, same_index = evaluate_model(model, frame, split, folder)
    except (OSError, ValueError, RuntimeError) as err:
        raise fail(str(err))
    if not same_index:
        typer.echo("note: this index differs from the one the model was trained on; splits are not the training ones")
    typer.echo(evaluation.report_text())
    typer.echo(f"model {card.version}; report files in {folder}")


@app.command()
def refit(
    model: Path = typer.Option(..., help="Exported model folder."),
    index_path: Path = typer.Option(..., "--index", help="The index.parquet the model was trained on."),
) -> None:
    """Fit a model's calibration and out-of-distribution detector again, without retraining (e.g. after an
    upgrade whose detector layout the folder predates); its valid and test metrics are measured again."""
    from xray_ray.training.evaluate import refit_model

    frame = read_index(index_path)
    try:
        card = refit_model(model, frame)
    except (OSError, ValueError, RuntimeError) as err:
        raise fail(str(err))
    ood, calibration = card["ood"], card["calibration"]
    typer.echo(f"model {card.version}: calibration {calibration['method']} refitted on valid, out-of-distribution "
               f"detector on {ood['train_images']} training images (threshold {ood['threshold']:.2f}, flags "
               f"{ood['valid_flag_rate']:.1%} of valid, {ood['test_flag_rate']:.1%} of test)")
    typer.echo(f"test accuracy {card['metrics']['test']['accuracy']:.3f}{synthetic_note(card.synthetic)}")


@app.command("tune")
@settings_options(TuneConfig, only=("name", "storage_path"))
def tune(
    given: dict,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    index_path: Path = typer.Option(None, "--index", help="index.parquet written by `xray-ray index` (an absolute "
                                    "path under `ray job submit`). On --resume, defaults to the experiment's index."),
    data_dir: Path = typer.Option(None, "--data", help="Dataset folder to index first, instead of --index; the index "
                                  "is saved as <report dir>/index.parquet."),
    out: Path = typer.Option(None, "--out", help="Model folder for the best trial (default models/NAME)."),
    report_dir: Path = typer.Option(None, "--report-dir", help="Report folder (default reports/tune/NAME)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted experiment NAME with its saved "
                                "settings: finished trials are kept, unfinished ones restart from their last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder and report."),
    address: str = ADDRESS_OPTION,
) -> None:
    """Tune hyperparameters with Ray Tune + Optuna, then export and evaluate the best trial's model.

    Relative output paths resolve under $XRAY_RAY_HOME, else the working folder (~/xray-ray when run by `ray job submit`, whose working folder is temporary).
    """
    from xray_ray.training.network import WeightsUnavailableError
    from xray_ray.tuning import experiment as tuning
    from xray_ray.tuning.storage import plan

    try:
        flags = {f"tune.{name}": value for name, value in given.items()}
        config, settings = tuning.load_experiment_config(config_file, overrides, flags, check_weights=not resume)
        experiment = plan(settings, out=out, report_dir=report_dir)
        saved = tuning.check_can_start(experiment, resume, overwrite)
        if saved is not None and (config_file or overrides):
            typer.echo("note: --resume continues with the settings saved with the experiment; --config and --set "
                       "only served to find it (tune.name, tune.storage_path)")
        with ray_session(address):
            frame, index_path = tuning.resolve_index(experiment, saved, index_path, data_dir)
            summary = tuning.run_experiment(frame, config, settings, experiment, resume=resume, overwrite=overwrite,
                                            index_path=str(Path(index_path).resolve()))
    except (FileExistsError, FileNotFoundError, WeightsUnavailableError, ValueError) as err:
        raise fail(str(err))
    except RuntimeError as err:
        raise fail(str(err), 1)
    typer.echo(f"experiment {summary['experiment']}: {summary['trials']} trials in {summary['storage_path']}")
    typer.echo(f"best trial {summary['best_trial']}: {summary['metric']} {summary['best_score']:.4f} with "
               + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary["best_params"].items()))
    typer.echo(f"model {summary['model_version']} exported to {summary['model']}; "
               f"test accuracy {summary['test_accuracy']:.3f}{synthetic_note(summary['synthetic_data'])}")
    if summary["errors"]:
        typer.echo(f"warning: {len(summary['errors'])} trial(s) failed for good: {summary['errors']}")
    typer.echo(f"report: {experiment.report_dir / 'index.html'}")


REGISTRY_OPTION = typer.Option(..., "--registry", help="Model registry folder (created by the first promotion).")


@app.command()
def promote(
    model: Path = typer.Option(..., help="Exported model folder to make the registry's current model."),
    registry: Path = REGISTRY_OPTION,
    force: bool = typer.Option(False, help="Skip the comparison with the current model (recorded as forced); the "
                               "model's own checks and golden set are never skipped."),
    reason: str = typer.Option("", help="Why, for the registry's history."),
) -> None:
    """Promote a model through the gate: it loads, reproduces its golden set, and is no worse than the current
    model on the same test split; then the registry's current pointer moves (Serve and scoring follow)."""
    from xray_ray.model_folder.registry import PromotionRefused
    from xray_ray.model_folder.registry import promote as promote_model

    try:
        event = promote_model(registry, model, force=force, reason=reason)
    except PromotionRefused as err:
        raise fail(str(err), 3)
    except (OSError, ValueError) as err:
        raise fail(str(err))
    was = f" (was {event['from']})" if event["from"] else ""
    typer.echo(f"{event['to']} is the current model of {registry}{was}" + (" [forced]" if event["forced"] else ""))
    if compared := event["figures"].get("current"):
        new = event["figures"]["candidate"]
        typer.echo("  " + ", ".join(f"{name} {compared[name]:.4f} -> {new[name]:.4f}"
                                    for name in ("accuracy", "macro_f1", "ece")))


@app.command()
def rollback(registry: Path = REGISTRY_OPTION,
             reason: str = typer.Option("", help="Why, for the registry's history.")) -> None:
    """Make the model promoted before the current one current again (after its golden set is reproduced)."""
    from xray_ray.model_folder.registry import PromotionRefused
    from xray_ray.model_folder.registry import rollback as roll_back

    try:
        event = roll_back(registry, reason=reason)
    except PromotionRefused as err:
        raise fail(str(err), 3)
    typer.echo(f"{event['to']} is the current model of {registry} again (was {event['from']})")
