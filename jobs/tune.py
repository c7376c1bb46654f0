"""Ray Tune + Optuna over the LRA trainer; the best trial's model exported and evaluated.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config configs/tune_demo.yaml --index /abs/path/index.parquet

Without a cluster, `python jobs/tune.py ...` starts a local Ray. The same command is
`xray-ray tune`; `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working folder's package, installed or not

from xray_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("tune", sys.argv[1:])
