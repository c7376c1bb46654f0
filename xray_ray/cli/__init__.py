"""The `xray-ray` command: one subcommand per job, each parsing its options and calling one function.

Errors a user can fix (a bad option, a missing file, an existing output) print one line
and exit 2; everything else is the owning module's. `jobs/*.py` run the same commands
through `run_job`, so `ray job submit` and the installed command behave alike.
"""

from xray_ray.cli import data, models, services  # noqa: F401 - importing them registers their commands
from xray_ray.cli.app import app, run_job

__all__ = ["app", "run_job"]
