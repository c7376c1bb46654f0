"""The search's settings that need no Ray: ASHA's grace period against the epochs a trial may run."""

from __future__ import annotations

import pytest

from xray_ray.config_training import TuneConfig
from xray_ray.tuning.search import asha_grace_period


@pytest.mark.parametrize(("grace", "epochs", "expected"), [(3, 16, 3), (3, 2, 2), (3, 1, 1), (1, 1, 1)])
def test_asha_grace_period_never_exceeds_the_epochs_a_trial_may_run(grace, epochs, expected):
    assert asha_grace_period(TuneConfig(grace_period=grace), epochs) == expected
