"""docs/grafana-dashboard.json queries only what the code exports: every metric name and
label in its queries is one a worker or beat serves (eskit_tasks.fleet.metrics), so a
renamed metric or label fails here instead of leaving an empty panel."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from eskit_tasks.fleet.metrics import exported_series
from tests import REPO

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
#: What the panels must show (issue 14): a title word for each.
WANTED = ["outcome", "stream type", "events deleted", "duration", "lock waits", "runs", "beat"]

_SERIES = re.compile(r"\b(eskit_[a-z_]+)(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
#: Labels Prometheus adds to every series it scrapes.
_TARGET_LABELS = {"instance", "job"}


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)  # a collapsed row keeps its panels inside


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append((f"${variable['name']}", query["query"]))
    return found


def test_the_dashboard_is_grafana_json_with_the_panels_asked_for():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    titles = " | ".join(p["title"].lower() for p in _panels(dashboard))
    for word in WANTED:
        assert word in titles, (word, titles)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize(("panel", "expr"), _queries(), ids=lambda v: v[:40])
def test_every_query_names_exported_metrics_and_labels(panel: str, expr: str):
    exported = exported_series()
    used = _SERIES.findall(expr)
    assert used, f"{panel}: queries no eskit metric: {expr}"
    labels: set[str] = set()
    for name, matchers in used:
        assert name in exported, f"{panel}: {name} is not exported (known: {sorted(exported)})"
        labels |= exported[name]
        for label in _MATCHER.findall(matchers):
            assert label in exported[name] | _TARGET_LABELS, f"{panel}: {name} has no {label}"
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in grouping.split(","))):
            assert label in labels | _TARGET_LABELS, f"{panel}: grouped by unknown {label}"


def test_every_exported_metric_is_on_the_dashboard():
    """The other direction: a new metric gets a panel (or a reason to be left out)."""
    queried = {name for _, expr in _queries() for name, _ in _SERIES.findall(expr)}
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported_series()}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    assert families - shown == set()


def test_legends_name_labels_their_query_keeps():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            labels = set().union(*(exported[n] for n, _ in _SERIES.findall(target["expr"])))
            for legend in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert legend in labels, (panel["title"], legend)
