"""Grad-CAM against known truth: on phantoms, the heat map's peak falls in the Lung_Opacity consolidation."""

from __future__ import annotations

import pytest

from tests.helpers import pointing_game
from xray_ray.model_folder.classifier import Classifier

pytestmark = pytest.mark.timeout(1200)


def test_heat_map_peak_falls_inside_the_consolidation(compact_model):
    """The pointing game on 48 unseen phantoms: >= 70 % of the correctly classified ones, far above chance."""
    folder, _, _ = compact_model
    game = pointing_game(Classifier(folder, engine="onnxruntime"), count=48, seed=2024)
    print(f"pointing game: {game['hits']}/{game['correct']} = {game['rate']:.0%} (chance {game['chance']:.1%})")
    assert game["correct"] >= 24, game  # enough correctly classified images for the rate to mean something
    assert game["rate"] >= 0.7, game
    assert game["rate"] >= 5 * game["chance"], game
