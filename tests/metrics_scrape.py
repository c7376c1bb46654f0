"""Reading Prometheus metrics as a scraper does: the text format parsed by prometheus_client, summed by labels."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict, float]]:
    """Every sample of a scrape: (name, labels, value)."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[tuple[str, dict, float]], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for sample, tags, value in found
               if sample == name and all(tags.get(key) == want for key, want in labels.items()))


def scrape_until(url: str, settled: Callable[[list], bool], timeout: float = 90.0) -> list:
    """Scrape `url` until `settled(samples)` holds (Ray exports every few seconds); the last scrape's samples."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as answer:
            found = samples(answer.read().decode())
        if settled(found) or time.monotonic() > deadline:
            return found
        time.sleep(2)
