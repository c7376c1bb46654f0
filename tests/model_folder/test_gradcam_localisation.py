"""Grad-CAM against known truth: on phantoms, the heat map's peak points at the Lung_Opacity consolidation.

Measured (benchmarks/bench_explain.py, reports/bench/explain.json): with the pointing game's standard
tolerance about two thirds of the peaks land on the consolidation, ten times chance; strictly inside
it about a quarter, fifteen times chance. The issue's goal of 70 % is not reached: this shared model
is trained briefly and about a fifth of its peaks sit on the map's bottom row (diaphragm and abdomen),
evidence it also uses; compact CNNs trained longer (the benchmark's default) reach 45-55 % strict and 72-84 % tolerant.
The bounds below are what holds with margin, so a regression in the explanation fails here.
"""

from __future__ import annotations

import pytest

from tests.helpers import pointing_game
from xray_ray.model_folder.classifier import Classifier

pytestmark = pytest.mark.timeout(1200)


def test_heat_map_peak_points_at_the_consolidation_far_above_chance(compact_model):
    folder, _, _ = compact_model
    game = pointing_game(Classifier(folder, engine="onnxruntime"), count=120, seed=2024)
    print(f"pointing game on {game['correct']} correctly classified: strict {game['strict']:.0%} (chance "
          f"{game['strict_chance']:.1%}), within {game['tolerance_px']:.1f} px {game['tolerant']:.0%} (chance "
          f"{game['tolerant_chance']:.1%}); peaks on the bottom row {game['bottom_edge']:.0%}")
    assert game["correct"] >= 40, game  # enough correctly classified images for the rates to mean something
    assert game["tolerant"] >= 0.5 and game["tolerant"] >= 5 * game["tolerant_chance"], game
    assert game["strict"] >= 5 * game["strict_chance"], game
