"""The Prometheus exporter: status and metrics JSON in, documented metric names out over HTTP."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from fedmq.broker import free_port  # noqa: E402
from fedmq.common.errors import ConfigError  # noqa: E402
from fedmq.master.prometheus import PrometheusExporter  # noqa: E402

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"

STATUS = {
    "job": "digits", "state": "training", "version": 4, "round": 5, "rounds": 30, "last_accuracy": 0.8125,
    "slaves": {"a": {"enrolled": True, "online": True, "samples": 10},
               "b": {"enrolled": True, "online": False, "samples": 12},
               "c": {"enrolled": False, "online": True, "samples": 0, "declined": "no data"}},
    "rejected": {"replay": 2, "bad_signature": 1}, "duplicates": 3, "updated": 1700000000.5,
}
ROW = {"job": "digits", "round": 5, "version": 5, "updates": 8, "samples": 1400, "seconds": 0.75,
       "aggregation_seconds": 0.02, "bytes_up": 300000, "bytes_down": 310000, "accuracy": 0.85, "loss": 0.4}


def scrape(port: int) -> dict[str, float]:
    """Every sample of the exposition, "name{labels}" -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_exporter_serves_the_documented_metrics() -> None:
    exporter = PrometheusExporter("digits")
    port = free_port()
    exporter.start(port)
    try:
        exporter.on_status(STATUS)
        exporter.on_metrics(ROW)
        exporter.on_metrics({**ROW, "round": 6, "version": 6, "updates": 7, "accuracy": 0.86})
        got = scrape(port)
    finally:
        exporter.close()
    job = '{job="digits"}'
    assert got[f"fedmq_round{job}"] == 5 and got[f"fedmq_rounds_planned{job}"] == 30
    assert got[f"fedmq_model_version{job}"] == 6 and got[f"fedmq_accuracy{job}"] == 0.86
    assert got[f"fedmq_loss{job}"] == 0.4
    assert got[f"fedmq_slaves_online{job}"] == 1 and got[f"fedmq_slaves_enrolled{job}"] == 2
    assert got[f"fedmq_updates_accepted_total{job}"] == 15
    assert got['fedmq_updates_rejected_total{job="digits",reason="replay"}'] == 2
    assert got['fedmq_updates_rejected_total{job="digits",reason="bad_signature"}'] == 1
    assert got[f"fedmq_duplicates_total{job}"] == 3
    assert got[f"fedmq_bytes_in_total{job}"] == 600000 and got[f"fedmq_bytes_out_total{job}"] == 620000
    assert got[f"fedmq_round_seconds_count{job}"] == 2 and got[f"fedmq_round_seconds_sum{job}"] == 1.5
    assert got[f"fedmq_aggregation_seconds_count{job}"] == 2
    assert got[f"fedmq_status_updated_timestamp_seconds{job}"] == 1700000000.5
    assert got['fedmq_state{job="digits",state="training"}'] == 1

    # Every metric name the exporter serves is documented, and every documented one is served.
    served = {re.sub(r"_(total|count|sum|bucket|created)$", "", name.split("{")[0]) for name in got}
    section = OPERATIONS.read_text().split("### 4.2 Prometheus")[1].split("\n## ")[0]
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"`(fedmq_[a-z_]+)`", section)}
    assert served == documented, served ^ documented


def test_a_taken_port_is_a_config_error() -> None:
    first, second = PrometheusExporter("a"), PrometheusExporter("b")
    port = free_port()
    first.start(port)
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            second.start(port)
    finally:
        first.close()
        second.close()


def test_bad_values_are_ignored_not_fatal() -> None:
    exporter = PrometheusExporter("digits")
    exporter.on_status({"round": "five", "slaves": [], "rejected": {"x": "many"}, "state": 3})
    exporter.on_metrics({"updates": -1, "seconds": None, "accuracy": True})
