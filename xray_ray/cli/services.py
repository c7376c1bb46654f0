"""`xray-ray serve`, `score` and `demo`: the long-running commands, which stop cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import typer

from xray_ray.cli.app import app, fail, synthetic_note
from xray_ray.ray_runtime import metrics_url, ray_stopped_on_interrupt, use_address


@app.command("serve")
def serve_model(
    model: Path = typer.Option(..., "--model", help="Exported model folder (model.keras, model.onnx, model_card.json)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; anything but loopback exposes the endpoint "
                             "to the network and needs a token (--token-file), and a firewall."),
    port: int = typer.Option(8000, help="HTTP port."),
    engine: str = typer.Option("auto", help="auto (ONNX Runtime when model.onnx is usable), onnxruntime or keras."),
    max_batch_size: int = typer.Option(16, min=1, help="Largest dynamic batch."),
    batch_wait_ms: float = typer.Option(20.0, min=0, help="How long a batch waits to fill, in milliseconds."),
    replicas: int = typer.Option(1, min=1, help="Replicas, each with its own copy of the model."),
    num_cpus: float = typer.Option(1.0, help="CPUs per replica (ONNX Runtime uses that many threads)."),
    num_gpus: float = typer.Option(0.0, help="GPUs per replica."),
    max_body_mb: float = typer.Option(64.0, help="Largest request body accepted (413 beyond)."),
    max_inflight_mb: float = typer.Option(256.0, help="Request bodies one replica holds at once (429 beyond): "
                                          "with the pixel cap, this bounds a replica's memory."),
    token_file: Path = typer.Option(None, help="File holding a bearer token required on every endpoint but /healthz "
                                    "(or set $XRAY_RAY_SERVE_TOKEN where the replicas run)."),
    insecure_no_token: bool = typer.Option(False, "--insecure-no-token", help="Serve on a non-loopback --host "
                                           "without a token (refused otherwise)."),
    expect_version: str = typer.Option(None, "--expect-version", help="Refuse to serve unless the model card "
                                       "names this version."),
    address: str = typer.Option(None, "--address", help="Ray cluster to deploy on (default RAY_ADDRESS, else a "
                                "local Ray is started and stopped with this command)."),
) -> None:
    """Serve a model over HTTP with Ray Serve until interrupted (Ctrl-C or SIGTERM)."""
    use_address(address)  # before Serve imports Ray
    from xray_ray.serving.app import serve_until_stopped
    from xray_ray.serving.settings import ServeSettings, check_exposure, read_token

    try:
        settings = ServeSettings(
            model=str(model.resolve()), engine=engine, max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_ms / 1000, num_replicas=replicas, num_cpus=num_cpus,
            num_gpus=num_gpus, max_body_mb=max_body_mb, max_inflight_mb=max_inflight_mb,
            token_file=str(token_file.resolve()) if token_file else None, expect_version=expect_version)
        # An empty or missing token file fails here, not in a replica.
        check_exposure(host, read_token(settings.token_file), insecure_no_token)
    except (OSError, ValueError) as err:
        raise fail(str(err))
    serve_until_stopped(settings, host, port, started=lambda: typer.echo(
        f"serving {model} at http://{host}:{port}/ (POST /predict, POST /predict/batch, GET /healthz, "
        f"GET /model, GET /stats); Prometheus metrics at {metrics_url()}; Ctrl-C stops"))


@app.command("score")
def score(
    archives: list[Path] = typer.Option(..., "--archive", help="Archive folder to score, any depth and layout "
                                        "(repeatable). PNG, JPEG, TIFF, BMP, .dcm, and DICOM files without extension."),
    model: Path = typer.Option(None, "--model", help="Exported model folder, e.g. models/NAME (required with "
                               "--backend actors)."),
    out: Path = typer.Option(..., "--out", help="Output folder: one dated run folder per night, plus the ledger."),
    backend: str = typer.Option("actors", "--backend", help="actors: the job's own Classifier actors; serve: the "
                                "running Serve application's replicas."),
    engine: str = typer.Option("auto", "--engine", help="auto, onnxruntime or keras (actors backend)."),
    actors: int = typer.Option(0, "--actors", help="Scoring actors (each holds one copy of the model); 0: from 1 "
                               "up to what fits the cluster, leaving room for reading."),
    cpus_per_actor: float = typer.Option(0.0, "--cpus-per-actor", help="CPUs Ray reserves per actor; 0: chosen "
                                         "from the cluster."),
    gpus_per_actor: float = typer.Option(None, "--gpus-per-actor", help="GPUs per actor (fractions share a GPU); "
                                         "default 1 where the cluster has GPUs."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime threads per actor; 0: the CPUs Ray gave the actor."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per model call."),
    read_cpus: float = typer.Option(0.5, "--read-cpus", help="CPUs Ray reserves per read/decode task."),
    labels: Path = typer.Option(None, "--labels", help="CSV with columns path (or file_path, relative to the CSV) "
                                "and label: the true classes, for accuracy. Class folders are used otherwise."),
    review_threshold: float = typer.Option(0.6, "--review-threshold", help="Answers less confident than this are "
                                           "listed for review."),
    top_n: int = typer.Option(10, "--top-n", help="Most confident images listed per class."),
    explain: int = typer.Option(24, "--explain", min=0, help="Images to review shown with a Grad-CAM heat map in the "
                                "report, at most (needs --model; 0: none)."),
    run: str = typer.Option(None, "--run", help="Run folder name (default: today's date)."),
    commit_rows: int = typer.Option(1000, "--commit-rows", help="Rows per committed predictions part."),
    files_per_task: int = typer.Option(256, "--files-per-task", help="Files per read task: the unit in which "
                                       "results arrive and are committed."),
    object_store_mb: int = typer.Option(256, "--object-store-mb", help="Object-store budget (MB) for decoded "
                                        "images waiting for the model; keeps memory flat in archive size."),
    address: str = typer.Option(None, "--address", help="Ray cluster (default RAY_ADDRESS; else a local Ray)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Read files and folders that symlinks "
                                         "lead to outside the archive folders (default: outside_archive error rows)."),
    expect_version: str = typer.Option(None, "--expect-version", help="Refuse (exit 3) a model whose card names "
                                       "another version."),
) -> None:
    """Score archive folders with the model: predictions, ledger and a per-class report per run.

    Exit code 0 when the run completed (any file that cannot be scored, for whatever reason, becomes an error row
    with a code), 2 for a bad configuration, 3 for an unusable model (or no running Serve app, or not the
    --expect-version), 4 for an unreachable archive.
    """
    use_address(address)  # before the scoring modules import Ray
    from xray_ray.scoring.options import ScoreError, ScoreOptions
    from xray_ray.scoring.run import score as run_scoring

    options = ScoreOptions(
        archives=[str(a) for a in archives], out=str(out), model=str(model) if model else None, backend=backend,
        engine=engine, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, threads=threads,
        batch_size=batch_size, read_cpus=read_cpus, labels=str(labels) if labels else None,
        review_threshold=review_threshold, top_n=top_n, explain=explain, run=run, commit_rows=commit_rows,
        files_per_task=files_per_task, object_store_mb=object_store_mb, follow_symlinks=follow_symlinks,
        expect_version=expect_version)
    try:
        with ray_stopped_on_interrupt():
            summary = run_scoring(options)
    except ScoreError as err:
        raise fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        raise fail("interrupted: the parts committed so far are kept; run the same command again to finish", 130)
    typer.echo(f"run {summary['run']}: {summary['scored']} images scored, {summary['errors']} unreadable, "
               f"{summary['skipped_already_scored']} skipped (already scored by {summary['model_version']})"
               + synthetic_note(summary["synthetic_data"]))
    typer.echo("  " + ", ".join(f"{name}: {count}" for name, count in summary["per_class"].items()))
    if summary["error_codes"]:
        typer.echo("  errors: " + ", ".join(f"{code}: {count}" for code, count in summary["error_codes"].items()))
    if summary["ground_truth"]:
        typer.echo(f"  accuracy {summary['ground_truth']['accuracy']:.3f} on {summary['ground_truth']['n']} images "
                   f"with a known class ({summary['ground_truth']['source']})")
    typer.echo(f"report: {Path(out) / summary['run'] / 'report' / 'index.html'}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", help="Folder for everything the demo writes."),
    backbone: str = typer.Option(None, "--backbone", help="compact (learns from scratch on a CPU; the default on "
                                 "synthetic data) or efficientnetb1 (the origin's network; the default with --data)."),
    data: Path = typer.Option(None, "--data", help="A real COVID-19 Radiography Database folder instead of "
                              "synthetic phantoms (real-size settings: configs/tune_real.yaml)."),
    per_class: int = typer.Option(150, min=4, help="Synthetic phantoms per class."),
    archive_per_class: int = typer.Option(10, min=1, help="Synthetic archive images per class to score."),
    overrides: list[str] = typer.Option(None, "--set", help="Override a tuning setting, e.g. --set tune.num_samples=2 "
                                        "(repeatable)."),
) -> None:
    """Run the whole system once: synthesize, index, tune, export, score an archive, serve; then stop it all."""
    from xray_ray.demo import DemoError, DemoOptions, run_demo

    if backbone not in (None, "compact", "efficientnetb1"):
        raise fail(f"--backbone must be compact or efficientnetb1, got {backbone!r}")
    if data is not None and not data.is_dir():
        raise fail(f"dataset folder not found: {data}")
    try:
        run_demo(DemoOptions(out=out, backbone=backbone, data=data, per_class=per_class,
                             archive_per_class=archive_per_class, tune_overrides=list(overrides or [])))
    except DemoError as err:
        raise fail(str(err), 1)
