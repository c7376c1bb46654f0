"""`python -m xray_ray.cli ...`, the same as `xray-ray ...`."""

from xray_ray.cli import app

app(prog_name="xray-ray")
