"""docs/grafana-dashboard.json: every series and label its queries ask for is one a server exports."""
import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exitwise.deploy.metrics import Metrics
from exitwise.deploy.tiers import _counters

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"


def exported() -> dict[str, set[str]]:
    """Each series name a tier's /metrics holds (histograms as _bucket, _sum, _count), with its label names."""
    metrics = Metrics()
    tier = _counters(metrics)  # a tier with a next tier registers these beside the server's
    metrics.latency.labels(endpoint="infer", code="200").observe(0.01)
    metrics.model.labels(model="m", platform="onnxruntime", precision="", micro_batch="64", early_exit="true",
                         stages="0-3", workers="1").set(1)
    metrics.batch(0, 4, 0.002)
    metrics.left(0, 3)
    metrics.dropped("timeout", 1)
    metrics.rejected.labels(reason="overloaded").inc()
    metrics.depth.labels(stage="0").set(2)
    for counter in tier.values():
        counter.inc()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    variables = [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in doc["panels"] for t in p["targets"]] + variables


def test_the_dashboard_asks_only_for_series_and_labels_the_server_exports():
    series, asked = exported(), queries()
    assert len(asked) >= 10
    for query in asked:
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}"), query
        names = re.findall(r"\b((?:exitwise|process)_\w+)", query)
        assert names, query
        for name in names:
            assert name in series, f"{name} is not exported ({query})"
        labels = set(re.findall(r"(?:by|ignoring) \(([^)]*)\)", query))
        labels = {x.strip() for group in labels for x in group.split(",")} | set(re.findall(r"(\w+)=~?\"", query))
        labels -= {"le", "job", "instance"}  # the histogram's buckets; Prometheus' own target labels
        have = set().union(*(series[n] for n in names))
        assert labels <= have, f"{query}: {labels - have} not among {have}"


def test_every_metric_of_a_server_and_a_tier_is_on_the_dashboard():
    """(A relay's own counters, exitwise_relayed_*, are not: it runs no model.)"""
    asked = set(re.findall(r"\b(exitwise_\w+)", " ".join(queries())))
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exported()
                if name.startswith("exitwise_")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in asked}
    assert len(families) >= 12 and families <= shown, families - shown
