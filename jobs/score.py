"""Nightly archive scoring: predictions, ledger and a per-class report per run.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --archive /abs/archive --model /abs/models/NAME --out /abs/scores

Without a cluster, `python jobs/score.py ...` starts a local Ray. The same entry point is
`xray-ray score`; `--help` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working folder's package, installed or not

import typer  # noqa: E402

from xray_ray.cli import score  # noqa: E402

if __name__ == "__main__":
    typer.run(score)
