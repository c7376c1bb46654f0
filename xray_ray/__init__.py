"""xray-ray: tune, serve and batch-score a chest X-ray classifier on Ray."""

__version__ = "0.1.0"
