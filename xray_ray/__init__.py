"""xray-ray: tune, serve and batch-score a chest X-ray classifier on Ray."""

# First, before any module here imports Ray: a local Ray must keep its listeners on loopback.
import xray_ray.ray_runtime  # noqa: F401

__version__ = "0.1.0"
