"""Scoring's metrics: live counters on the Ray node's Prometheus endpoint while a run goes, and the text
files node-exporter collects when it ends, both equal to the run's summary."""

from __future__ import annotations

import pytest

from tests.badfiles import write_bad_files
from tests.metrics_scrape import samples, scrape_until, total
from xray_ray.config import CLASS_NAMES
from xray_ray.images import synth
from xray_ray.scoring.metrics import LATEST_FILE, RUN_FILE, prometheus_text
from xray_ray.config_services import ScoreConfig

SUMMARY = {"run": 'night "1"', "model_version": "m-1", "scored": 7, "errors": 3, "out_of_distribution": 2,
           "per_class": dict(zip(CLASS_NAMES, [2, 1, 1, 1])), "error_codes": {"truncated": 2, "not_an_image": 1},
           "scored_this_time": 4, "timing": {"wall_s": 12.5, "images_per_s": 0.32}, "drift": {"shifted": True}}


def test_the_text_file_holds_the_summary_in_prometheus_format():
    found = samples(prometheus_text(SUMMARY))  # parsed as Prometheus parses it: quotes in labels escaped
    run = {"run": 'night "1"', "model_version": "m-1"}
    assert total(found, "xray_scoring_last_run_files", status="ok", **run) == 7
    assert total(found, "xray_scoring_last_run_files", status="error") == 3
    assert total(found, "xray_scoring_last_run_errors", code="truncated") == 2
    assert {name: total(found, "xray_scoring_last_run_predictions", predicted_class=name)
            for name in CLASS_NAMES} == SUMMARY["per_class"]
    assert total(found, "xray_scoring_last_run_out_of_distribution") == 2
    assert total(found, "xray_scoring_last_run_images_per_second") == 0.32
    assert total(found, "xray_scoring_last_run_drift_shifted") == 1
    assert total(found, "xray_scoring_last_run_finished_timestamp_seconds") > 1.7e9


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_exports_live_counters_and_leaves_text_files_equal_to_its_summary(compact_model, ray_local, tmp_path):
    from xray_ray.ray_runtime import metrics_url
    from xray_ray.scoring.run import score

    archive = tmp_path / "archive"
    synth.write_dataset(archive, per_class=2, size=96, seed=11)
    write_bad_files(archive / "bad")
    out = tmp_path / "out"
    summary = score(ScoreConfig(archives=[str(archive)], model=str(compact_model[0]), out=str(out), run="metrics",
                                 explain=0))
    assert summary["errors"] > 0 and summary["scored"] == 8
    tags = {"run": "metrics", "model_version": summary["model_version"]}
    live = scrape_until(metrics_url(), lambda found: total(found, "ray_xray_scoring_files_total", **tags)
                        == summary["files"])
    assert total(live, "ray_xray_scoring_files_total", status="ok", **tags) == summary["scored"]
    assert total(live, "ray_xray_scoring_files_total", status="error", **tags) == summary["errors"]
    assert {code: total(live, "ray_xray_scoring_errors_total", code=code, **tags)
            for code in summary["error_codes"]} == summary["error_codes"]
    assert total(live, "ray_xray_scoring_out_of_distribution_total", **tags) == summary["out_of_distribution"]
    answered = {name: total(live, "ray_xray_scoring_predictions_total", predicted_class=name, **tags)
                for name in CLASS_NAMES}
    assert sum(answered.values()) == summary["scored"]  # flagged answers included, as they are answers
    assert total(live, "ray_xray_scoring_images_per_second", **tags) > 0

    run_file = (out / "metrics" / RUN_FILE).read_text()
    assert (out / LATEST_FILE).read_text() == run_file
    saved = samples(run_file)
    assert total(saved, "xray_scoring_last_run_files", status="ok", **tags) == summary["scored"]
    assert {name: total(saved, "xray_scoring_last_run_predictions", predicted_class=name)
            for name in CLASS_NAMES} == summary["per_class"]
