"""Every default is written once: each command option that sets a setting takes its default and help from
that setting's field, and the flags a user gives win over `--set`, which wins over the YAML file."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import typer
from typer.testing import CliRunner

from xray_ray.cli import app
from xray_ray.config_field import default_of
from xray_ray.config_services import ScoreConfig, ServeConfig
from xray_ray.config_training import TuneConfig
from xray_ray.demo import DemoOptions

SECTIONS = {"score": ScoreConfig, "serve": ServeConfig, "tune": TuneConfig, "demo": DemoOptions}
COVERED = {"score", "serve"}
"""Commands whose every setting has an option (tune exposes only its name and storage path; the rest are --set)."""


def command_params(name: str) -> dict:
    return {param.name: param for param in typer.main.get_command(app).commands[name].params}


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_cli_defaults_and_help_are_the_settings_fields(command):
    section = SECTIONS[command]
    fields = {spec.name: spec for spec in dataclasses.fields(section)}
    params = command_params(command)
    checked = 0
    for name, param in params.items():
        if name not in fields:
            continue
        default = default_of(fields[name])
        expected = None if isinstance(default, list) else default  # a repeatable option starts empty
        assert param.default == expected, f"{command} --{name}: CLI default {param.default!r}, setting {default!r}"
        assert param.help == fields[name].metadata["help"], f"{command} --{name}: help differs from the setting's"
        checked += 1
    assert checked, f"no option of {command} sets a field of {section.__name__}"
    if command in COVERED:
        assert set(fields) <= set(params), f"{command} lacks options for {sorted(set(fields) - set(params))}"


def test_flags_beat_set_which_beats_the_yaml_file(tmp_path, monkeypatch):
    from xray_ray.scoring.preflight import ScoreError

    seen = {}

    def capture(settings):
        seen["settings"] = settings
        raise ScoreError("captured", 2)

    monkeypatch.setattr(sys.modules["xray_ray.scoring.preflight"], "check_run", capture)
    config = tmp_path / "nightly.yaml"
    config.write_text("score:\n  archives: [/data/a]\n  batch_size: 8\n  top_n: 5\n  review_threshold: 0.7\n")
    result = CliRunner().invoke(app, ["score", "--config", str(config), "--set", "score.top_n=3",
                                      "--set", "score.batch_size=16", "--batch-size", "4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "captured" in result.output
    settings = seen["settings"]
    assert (settings.batch_size, settings.top_n, settings.review_threshold) == (4, 3, 0.7)
    assert settings.archives == ["/data/a"] and settings.out == str(tmp_path)
    assert settings.explain == ScoreConfig().explain  # neither given: the field's default


@pytest.mark.parametrize("args, message", [
    (["score", "--archive", "a", "--out", "o", "--model", "m", "--batch-size", "0"],
     "score.batch_size must be at least 1"),
    (["score", "--archive", "a", "--out", "o", "--set", "score.backend=cloud"], "score.backend must be one of"),
    (["serve", "--model", "m", "--max-batch-size", "16", "--max-ongoing-requests", "4"], "max_ongoing_requests"),
    (["serve", "--set", "serve.nope=1"], "unknown setting(s) in serve.: nope"),
    (["score", "--pacs", "https://pacs/dicom-web", "--study-date", "20261301", "--out", "o", "--model", "m"],
     "score.study_date must be a date YYYYMMDD"),
    (["score", "--pacs", "https://pacs/dicom-web", "--study-date", "20261202-20261201", "--out", "o", "--model", "m"],
     "of real dates in order"),
    (["score", "--pacs", "https://pacs/dicom-web", "--out", "o", "--model", "m"], "score.pacs needs score.study_date"),
    (["score", "--archive", "a", "--pacs", "https://pacs/dicom-web", "--study-date", "20261201", "--out", "o",
      "--model", "m"], "give score.archives or score.pacs, not both"),
    (["score", "--archive", "a", "--pacs-store", "--out", "o", "--model", "m"], "score.pacs_store sends results"),
])
def test_a_bad_setting_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
