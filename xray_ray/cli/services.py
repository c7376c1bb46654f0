"""`xray-ray serve`, `score` and `demo`: the long-running commands, which stop cleanly on Ctrl-C or SIGTERM.

`serve` and `score` take their settings from the config's `serve:` and `score:` sections
(`--config`, `--set`), and each flag sets one field of them; both run in one Ray session."""

from __future__ import annotations

from pathlib import Path

import typer

from xray_ray.cli.app import ADDRESS_OPTION, app, config_options, fail, settings_options, synthetic_note
from xray_ray.config import Config
from xray_ray.demo import DemoOptions
from xray_ray.ray_runtime import metrics_url, ray_session


@app.command("serve")
@config_options("serve", flags={"num_replicas": "--replicas"})
def serve_model(config: Config, address: str = ADDRESS_OPTION) -> None:
    """Serve a model over HTTP with Ray Serve until interrupted (Ctrl-C or SIGTERM)."""
    from xray_ray.serving.settings import check_exposure, checked_model, read_token

    settings = config.serve
    try:
        settings = checked_model(settings)  # the card, detector and version, before any replica starts
        # An empty or missing token file fails here, not in a replica.
        check_exposure(settings.host, read_token(settings.token_file), settings.insecure_no_token)
    except (OSError, ValueError) as err:
        raise fail(str(err))
    what = settings.model or f"the current model of the registry {settings.registry}"
    with ray_session(address):
        from xray_ray.serving.stopping import serve_until_stopped

        serve_until_stopped(settings, started=lambda: typer.echo(
            f"serving {what} at http://{settings.host}:{settings.port}/ (POST /predict, POST "
            f"/predict/batch, POST /explain, GET /healthz, GET /model, GET /stats); Prometheus metrics at "
            f"{metrics_url()}; Ctrl-C stops"))


@app.command("score")
@config_options("score", flags={"archives": "--archive"})
def score(config: Config, address: str = ADDRESS_OPTION) -> None:
    """Score archive folders, or a PACS's studies of some dates, with the model: predictions, ledger and a
    per-class report per run, and DICOM SRs (--sr-out, --pacs-store).

    Exit code 0 when the run completed (any file or instance that cannot be scored, for whatever reason, becomes
    an error row with a code), 2 for a bad configuration, 3 for an unusable model (or no running Serve app, or not
    the --expect-version), 4 for an unreachable archive, 5 when the --out folder's disk lacks the space the run
    needs (checked before Ray starts, and when the disk fills up during the run: what was committed stays, and the
    same command completes the run once there is space), 6 when the PACS cannot be reached or refuses the
    credentials as the run starts.
    """
    from xray_ray.scoring.preflight import ScoreError, check_run
    from xray_ray.scoring.run import score as run_scoring

    settings = config.score
    try:
        checked = check_run(settings)  # settings, archives, labels and a model folder, before Ray starts
        with ray_session(address, profile=settings.ray_profile):
            summary = run_scoring(settings, checked)
    except ScoreError as err:
        raise fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        raise fail("interrupted: the parts committed so far are kept; run the same command again to finish", 130)
    typer.echo(f"run {summary['run']}: {summary['scored']} images scored, {summary['errors']} unreadable, "
               f"{summary['skipped_already_scored']} skipped (already scored by {summary['model_version']})"
               + synthetic_note(summary["synthetic_data"]))
    typer.echo("  " + ", ".join(f"{name}: {count}" for name, count in summary["per_class"].items()))
    if pacs := summary.get("pacs"):
        typer.echo(f"  PACS: {pacs['studies']} studies, {pacs['instances']} instances, {pacs['selected']} selected; "
                   "skipped: " + (", ".join(f"{code}: {n}" for code, n in pacs["skipped"].items()) or "none"))
    if results := summary.get("dicom_results"):
        typer.echo(f"  DICOM SRs: {results.get('sr_written', 0)} written, {results.get('sr_stored', 0)} stored in the "
                   f"PACS, {results.get('store_refused', 0)} refused; {results.get('not_dicom', 0)} answers were "
                   "not DICOM inputs (no SR)")
    if summary["error_codes"]:
        typer.echo("  errors: " + ", ".join(f"{code}: {count}" for code, count in summary["error_codes"].items()))
    if summary["ground_truth"]:
        typer.echo(f"  accuracy {summary['ground_truth']['accuracy']:.3f} on {summary['ground_truth']['n']} images "
                   f"with a known class ({summary['ground_truth']['source']})")
    typer.echo(f"report: {Path(settings.out) / summary['run'] / 'report' / 'index.html'}")


@app.command("demo")
@settings_options(DemoOptions, flags={"tune_overrides": "--set"}, only=(
    "out", "backbone", "data", "per_class", "archive_per_class", "tune_overrides"))
def demo(given: dict) -> None:
    """Run the whole system once: synthesize, index, tune, export, score an archive, serve; then stop it all."""
    from xray_ray.demo import DemoError, run_demo

    try:
        options = DemoOptions(**given)
    except ValueError as err:
        raise fail(str(err))
    try:
        run_demo(options)
    except DemoError as err:
        raise fail(str(err), 1)
