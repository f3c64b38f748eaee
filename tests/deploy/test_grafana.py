"""The Grafana dashboard queries only metrics the gateway and the workers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import api.gateway.metrics  # noqa: F401 (registers the gateway's metrics)
import workers.metrics  # noqa: F401 (registers the workers' metrics)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "heartcluster.json"
# Families collected only when scraped (Redis, the engine, the GPU): named in their modules.
SCRAPE_TIME = {
    "heartcluster_queue_depth",
    "heartcluster_engine_rows",
    "heartcluster_engine_waiting_requests",
    "heartcluster_gpu_memory_bytes",
}


def _exported() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type in ("counter",):
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
    return names


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"heartcluster_\w+", expr)}
    sources = "".join(
        Path(module.__file__).read_text() for module in (api.gateway.metrics, workers.metrics)
    )
    for name in SCRAPE_TIME:
        assert f'"{name}"' in sources
    missing = used - _exported() - SCRAPE_TIME
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
