"""deploy/grafana/pneumo-gateway.json against the gateway it charts: every metric an expression
names must be one a live gateway exposes on /metrics (so a renamed metric fails here, not as an
empty panel), the data source is the ``${DS_PROMETHEUS}`` variable, and the gateway pod's
Prometheus annotations point at the real port, scheme and route."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.http import build_app
from tests.deploy import compose_checks as cc
from tests.deploy import k8s_checks as kc

DASHBOARD = cc.ROOT / "deploy" / "grafana" / "pneumo-gateway.json"
_NAME = re.compile(r"\b((?:pneumo|process)_[a-zA-Z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exposed_names(exposition: str) -> set[str]:
    """Every series name the exposition can carry, samples or not (a counter that has not counted
    yet still declares its family)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def unknown_metrics(dashboard: dict[str, Any], exposed: set[str]) -> list[str]:
    return sorted({name for panel in panels(dashboard) for target in panel["targets"]
                   for name in _NAME.findall(target["expr"]) if name not in exposed})


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load()


def test_every_metric_in_the_dashboard_is_exposed(dashboard: dict[str, Any], gateway_factory: Callable[..., Any]) -> None:
    gateway = gateway_factory(sections={"fhir": {"port": 0, "auth": {"mode": "anonymous"}}})
    exposition = httpx.get(f"http://127.0.0.1:{gateway.http.port}/metrics", timeout=10).text
    exposed = exposed_names(exposition)
    used = {name for panel in panels(dashboard) for target in panel["targets"] for name in _NAME.findall(target["expr"])}
    assert len(used) >= 15
    assert unknown_metrics(dashboard, exposed) == []
    broken = copy.deepcopy(dashboard)
    panels(broken)[0]["targets"][0]["expr"] = "rate(pneumo_instances_received_total[5m])"
    assert unknown_metrics(broken, exposed) == ["pneumo_instances_received_total"]


def test_the_data_source_is_a_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_panels_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    for wanted in ["pneumo_instances_stored_total", "pneumo_jobs", "pneumo_job_oldest_due_age_seconds",
                   "histogram_quantile(0.5, sum by (le, stage) (rate(pneumo_inference_stage_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le, stage) (rate(pneumo_inference_stage_seconds_bucket",
                   "pneumo_predictions_total", "pneumo_not_analysed_total", "pneumo_delivery_failures_total",
                   "sum by (le, route) (rate(pneumo_http_request_duration_seconds_bucket", "pneumo_hl7_messages_total",
                   "sum by (calling_ae, end) (rate(pneumo_dicom_associations_total",
                   "sum by (le, calling_ae) (rate(pneumo_dicom_association_seconds_bucket"]:
        assert wanted in exprs, wanted


def test_the_gateway_pod_is_annotated_for_the_scraper() -> None:
    manifests = kc.Manifests.load()
    deployment = manifests.named("Deployment", "pneumo-gateway")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (container,) = kc.containers(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["https"]
    assert annotations["prometheus.io/scheme"] == "https"  # [fhir.tls] is on in the ConfigMap
    routes = {getattr(r, "path", "") for r in build_app(lambda: {}, metrics=CollectorRegistry()).routes}
    assert annotations["prometheus.io/path"] in routes
    assert annotations["prometheus.io/path"] not in {getattr(r, "path", "") for r in build_app(lambda: {}).routes}
