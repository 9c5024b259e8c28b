"""Every metric the deployment files query is exported by the running server's /metrics.

The Grafana dashboard, the Prometheus-adapter rule and the queue-depth HPA name metrics by
string; a renamed metric would leave an empty panel or an autoscaler that never scales. This
starts the real app (``create_app``) with the fake engine from tests/fakes.py, sends a few
requests, scrapes ``/metrics`` and checks every queried name against what it exports.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/mtserve.json"
ADAPTER_VALUES = ROOT / "deploy/k8s/components/hpa-queue-depth/prometheus-adapter-values.yaml"
HPA_COMPONENT = ROOT / "deploy/k8s/components/hpa-queue-depth/kustomization.yaml"

METRIC_RE = re.compile(r"\bmtserve_[A-Za-z0-9_]+")


def _strings(node) -> list[str]:
    """Every string inside a JSON/YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def dashboard_metric_names() -> set[str]:
    """Metric names in the dashboard's PromQL: panel targets and template-variable queries."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            exprs += _strings(var.get("query")) + _strings(var.get("definition"))
    return {m for e in exprs for m in METRIC_RE.findall(e)}


def autoscaling_metric_names() -> set[str]:
    """Metric names the Prometheus adapter rule discovers and the queue-depth HPA asks for."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    names = {m for s in _strings(values["rules"]["custom"]) for m in METRIC_RE.findall(s)}
    names |= set(METRIC_RE.findall(HPA_COMPONENT.read_text()))
    return names


def exported_sample_names(metrics_text: str) -> set[str]:
    """Sample names a Prometheus scrape of this text can return, from the exposition's TYPE lines
    (so a labelled histogram with no observation yet still counts) and the samples present."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of the real app (fake engine) after a few requests to every task."""
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.fakes import FakeEngine

    engine = FakeEngine()
    settings = Settings(bundle=tmp_path_factory.mktemp("unused-bundle"), warmup=False)
    with TestClient(create_app(settings, engine=engine)) as client:
        for _ in range(100):  # readiness comes after start-up (at once with the fake engine)
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200
        for i, task in enumerate(engine.manifest.tasks):
            r = client.post(f"/predict/{task}", content=_png(i), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
        # An error code, so that the errors-by-code panel has a series too.
        r = client.post(f"/predict/{task}", content=b"not an image", headers={"content-type": "image/png"})
        assert r.status_code >= 400
        response = client.get("/metrics")
        assert response.status_code == 200
        return response.text


def test_dashboard_queries_metrics(metrics_text: str) -> None:
    queried = dashboard_metric_names()
    # The dashboard must cover the panels.
    for name in (
        "mtserve_requests_total",
        "mtserve_request_duration_seconds_bucket",
        "mtserve_batch_size_bucket",
        "mtserve_batch_tasks_bucket",
        "mtserve_queue_depth",
    ):
        assert name in queried, f"dashboard does not query {name}"
    missing = queried - exported_sample_names(metrics_text)
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"


def test_autoscaling_metric_is_exported(metrics_text: str) -> None:
    names = autoscaling_metric_names()
    assert names == {"mtserve_queue_depth"}, names
    missing = names - exported_sample_names(metrics_text)
    assert not missing, f"the queue-depth autoscaler asks for metrics the server does not export: {missing}"


def test_requests_produced_series(metrics_text: str) -> None:
    """The requests above really went through the instrumented path (guards against a vacuous pass)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    codes = {s.labels.get("code") for s in families["mtserve_requests"].samples if s.name.endswith("_total")}
    assert "200" in codes and any(c and not c.startswith("2") for c in codes), codes
    assert any(s.value > 0 for s in families["mtserve_batch_tasks"].samples if s.name.endswith("_count"))


def test_name_helpers() -> None:
    text = (
        "# HELP mtserve_x_seconds t\n# TYPE mtserve_x_seconds histogram\n"
        "# HELP mtserve_requests r\n# TYPE mtserve_requests counter\n"
        'mtserve_requests_total{task="a"} 1.0\n'
        "# HELP mtserve_queue_depth q\n# TYPE mtserve_queue_depth gauge\nmtserve_queue_depth 0.0\n"
    )
    names = exported_sample_names(text)
    assert {"mtserve_x_seconds_bucket", "mtserve_x_seconds_sum", "mtserve_requests_total"} <= names
    assert "mtserve_queue_depth" in names and "mtserve_requests" not in names
