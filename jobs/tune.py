"""Ray Tune + Optuna over the LRA trainer; the best trial's model exported and evaluated.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config configs/tune_demo.yaml --index /abs/path/index.parquet

Without a cluster, `python jobs/tune.py ...` starts a local Ray. The same entry point is
`xray-ray tune`; `--help` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working folder's package, installed or not

import typer  # noqa: E402

from xray_ray.cli import tune  # noqa: E402

if __name__ == "__main__":
    typer.run(tune)
