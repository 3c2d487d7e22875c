"""Reading a service's live /metrics, for tests that check counters moved."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from shepherd_cli.servicemetrics import Samples, parse


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by (name, sorted labels), and the metric families' names."""

    samples: Samples
    families: set[str]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels, 0 if absent (a labelled child not created yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        """Every sample name (histograms give _bucket, _sum and _count; counters _total)."""
        return {name for name, _ in self.samples} | self.families


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        text = await response.text()
    families = {family.name for family in text_string_to_metric_families(text)}
    return Scrape(parse(text), families)
