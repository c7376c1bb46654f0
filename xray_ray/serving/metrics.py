"""The Serve application's Prometheus metrics, recorded through Ray's metrics (`ray.util.metrics`).

Each Ray node exports its processes' metrics on its metrics export port (`/metrics`, with
Ray's `ray_` prefix): on a Ray this project starts that port is on 127.0.0.1, on a cluster
`ray start --metrics-export-port=...` fixes it (`ray_runtime.metrics_url`). Every series
carries `application` (the Serve application's name), `model_version` and `engine`; Ray
adds its own (`WorkerId`, `NodeAddress`, `SessionName`...). Names, as scraped:

* `ray_xray_serve_predictions_total{predicted_class, source}`:
  answers given, by class; `source` is `http` (/predict, /predict/batch) or `scoring` (the
  scoring job's serve backend). Answers flagged out of distribution count here too;
* `ray_xray_serve_out_of_distribution_total{source}`: answers flagged;
* `ray_xray_serve_rejected_total{reason}`: requests (or files of
  /predict/batch) refused with a 4xx or 5xx, by the error code of the answer;
* `ray_xray_serve_request_seconds{route, status}`: latency of each HTTP request,
  from its arrival at the replica to its answer (histogram);
* `ray_xray_serve_batch_size`: images per forward pass of the batcher (histogram);
* `ray_xray_serve_model_reloads_total{outcome}`: the registry's current model loaded by a
  replica following it (`loaded`), or refused (`failed`: it did not load or did not
  reproduce its golden set; the replica keeps its model).

Ray 2.60 exports a histogram's `_sum` from its bucket midpoints, not the values observed:
read latency and batch size from the buckets and `_count`.

One `ServeMetrics` per replica process (`replica_metrics`), created by the replica, so the
module-level error handler records into the same counters.
"""

from __future__ import annotations

from collections import Counter as Tally

from ray.util.metrics import Counter, Histogram

from xray_ray.model_folder.classifier import Predictions

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
ROUTES = ("/predict", "/predict/batch", "/explain", "/healthz", "/model", "/stats")
MODEL_TAGS = ("application", "model_version", "engine")


class ServeMetrics:
    """The replica's counters and histograms, tagged with its Serve application and the model version and
    engine it serves (two applications on one cluster, say a canary, are told apart)."""

    def __init__(self, application: str, model_version: str, engine: str) -> None:
        self.predictions = Counter("xray_serve_predictions_total", "Answers given, by predicted class and source.",
                                   tag_keys=("predicted_class", "source", *MODEL_TAGS))
        self.out_of_distribution = Counter("xray_serve_out_of_distribution_total",
                                           "Answers flagged out of distribution.", tag_keys=("source", *MODEL_TAGS))
        self.rejected = Counter("xray_serve_rejected_total", "Requests or files refused, by error code.",
                                tag_keys=("reason", *MODEL_TAGS))
        self.latency = Histogram("xray_serve_request_seconds", "Seconds from a request's arrival to its answer.",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("route", "status", *MODEL_TAGS))
        self.batch_size = Histogram("xray_serve_batch_size", "Images per forward pass.",
                                    boundaries=BATCH_BOUNDARIES, tag_keys=MODEL_TAGS)
        self.reloads = Counter("xray_serve_model_reloads_total", "Registry models loaded or refused, by outcome.",
                               tag_keys=("outcome", *MODEL_TAGS))
        self.application = application
        self.serving(model_version, engine)

    def serving(self, model_version: str, engine: str) -> None:
        """Tag what follows with the model now answering (after a swap to the registry's new current model)."""
        tags = {"application": self.application, "model_version": model_version, "engine": engine}
        for metric in (self.predictions, self.out_of_distribution, self.rejected, self.latency, self.batch_size,
                       self.reloads):
            metric.set_default_tags(tags)

    def answered(self, predictions: Predictions, source: str) -> None:
        """Count one forward pass's answers by class, and those flagged out of distribution."""
        for name, n in Tally(predictions.labels).items():
            self.predictions.inc(n, tags={"predicted_class": name, "source": source})
        flagged = int(predictions.out_of_distribution.sum())
        if flagged:
            self.out_of_distribution.inc(flagged, tags={"source": source})

    def request(self, path: str, status: int, seconds: float) -> None:
        """One HTTP request's latency; paths outside the API share one route tag (no unbounded label values)."""
        self.latency.observe(seconds, tags={"route": path if path in ROUTES else "other", "status": str(status)})


_replica_metrics: ServeMetrics | None = None


def replica_metrics(application: str | None = None, model_version: str = "", engine: str = "") -> ServeMetrics | None:
    """This process's ServeMetrics: created by the first call that names the application, None before that."""
    global _replica_metrics
    if _replica_metrics is None and application is not None:
        _replica_metrics = ServeMetrics(application, model_version, engine)
    return _replica_metrics
