"""Nightly archive scoring: predictions, ledger and a per-class report per run.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --archive /abs/archive --model /abs/models/NAME --out /abs/scores

A night's studies from a PACS instead, with an SR per answer stored back (docs/pacs.md):

    ... python jobs/score.py --pacs https://pacs.example.org/dicom-web --study-date 20261201-20261202 \
        --pacs-credentials /abs/pacs.json --model /abs/models/NAME --out /abs/scores --pacs-store

Without a cluster, `python jobs/score.py ...` starts a local Ray. The same command is
`xray-ray score`; `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working folder's package, installed or not

from xray_ray.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("score", sys.argv[1:])
