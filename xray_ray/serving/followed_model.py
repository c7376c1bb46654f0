"""The model a Serve replica answers with: one folder, or the registry's current model, followed in place.

With `serve.registry`, each replica looks at the registry's `current.json` every
`serve.registry_poll_s`. When the pointer moves, the new model is loaded beside the one
answering, in a background thread, and must reproduce its golden set (`Classifier` checks
it) before it answers anything; then one reference is swapped. Requests already being
answered finish on the model that prepared their image, later ones get the new one, and no
replica goes back. A model that does not load or does not reproduce its golden set leaves
the old one answering; the failure goes to the log, the reload metric and `/model`
(`last_reload`), and is not tried again until the pointer moves again.

Why in place and not Serve's rolling update: a rolling update replaces replicas, keeps
availability only with two or more, and needs a driver to push it; the replica watching the
registry needs neither, so `xray-ray serve`, a Serve config and KubeRay's RayService all
follow the same folder the same way, with one replica too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from xray_ray.config_services import ServeConfig
from xray_ray.model_folder.classifier import Classifier
from xray_ray.model_folder.registry import current_folder, current_version
from xray_ray.serving.settings import model_folder

log = logging.getLogger(__name__)


class FollowedModel:
    """`classifier` is the model answering now; with a registry, a daemon thread swaps in its new current
    model once that one has loaded and reproduced its golden set. `reloaded("loaded" or "failed")` is called
    after each attempt (the replica's metrics)."""

    def __init__(self, settings: ServeConfig, reloaded: Callable[[str], None] = lambda _: None) -> None:
        self.settings = settings
        self.classifier = Classifier(model_folder(settings), engine=settings.engine)
        self.reloaded = reloaded
        self.last_reload: dict | None = None
        self._tried: str | None = None
        if settings.registry:
            threading.Thread(target=self._follow, name="registry-follower", daemon=True).start()

    def _follow(self) -> None:
        while True:
            time.sleep(self.settings.registry_poll_s)
            try:
                self.check_registry()
            except Exception:  # the follower must outlive any surprise: the model answering stays
                log.exception("following the registry failed; the model answering stays")

    def check_registry(self) -> None:
        """Load the registry's current model if it moved since the last look; keep the old one when it fails."""
        wanted = current_version(self.settings.registry)
        if wanted in (None, self.classifier.version, self._tried):
            return
        self._tried = wanted
        started = time.perf_counter()
        try:
            candidate = Classifier(current_folder(self.settings.registry), engine=self.settings.engine)
            if candidate.version != wanted:
                raise ValueError(f"the registry's folder for {wanted} holds {candidate.version}")
        except Exception as err:  # any failure of the new model is its own: the old one keeps answering
            self.last_reload = self._reload(wanted, "failed", started, f"{type(err).__name__}: {err}")
            log.error("registry model %s refused, still serving %s: %s", wanted, self.classifier.version, err)
            self.reloaded("failed")
            return
        previous, self.classifier = self.classifier, candidate
        self.last_reload = self._reload(wanted, "loaded", started)
        log.info("now serving %s (was %s), loaded and checked in %.1f s", wanted, previous.version,
                 self.last_reload["seconds"])
        self.reloaded("loaded")

    def _reload(self, version: str, outcome: str, started: float, error: str | None = None) -> dict:
        return {"version": version, "outcome": outcome, "error": error,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - started, 2)}

    def describe(self) -> dict:
        """For `/model`: whether a registry is followed, how often, and the last reload (no paths)."""
        return {"follows_registry": bool(self.settings.registry), "poll_s": self.settings.registry_poll_s,
                "last_reload": self.last_reload}
