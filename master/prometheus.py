"""Prometheus metrics of one job: the master's status and metrics JSON, served on /metrics.

The master already says everything worth graphing in the JSON it publishes (the
retained status, one metrics row per aggregation); the exporter turns each of those
messages into metric values, so a dashboard and `mosquitto_sub` never disagree. Its
HTTP server runs on a thread of prometheus-client's, listens on loopback unless told
otherwise, and has a registry of its own (several exporters may live in one process,
as in the tests). Names and meanings: docs/OPERATIONS.md, "Prometheus".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from fedmq.common.errors import ConfigError

try:
    import prometheus_client as prom
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # the [metrics] extra is not installed
    prom = None  # type: ignore[assignment]
    Collector = object  # type: ignore[assignment,misc]

#: Round and aggregation durations (seconds): a 0.1 s round of a small model to a
#: 10-minute round of a fleet with a long deadline.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))


class PrometheusExporter:
    """Metrics of job `job`, fed with every status and metrics JSON the master publishes."""

    def __init__(self, job: str) -> None:
        if prom is None:
            raise ConfigError("Prometheus metrics need prometheus-client: pip install 'fedmq[metrics]'")
        self.job = job
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        job_label = ["job"]

        def gauge(name: str, doc: str) -> Any:
            return prom.Gauge(name, doc, job_label, registry=self.registry).labels(job)

        def counter(name: str, doc: str) -> Any:
            return prom.Counter(name, doc, job_label, registry=self.registry).labels(job)

        def histogram(name: str, doc: str) -> Any:
            return prom.Histogram(name, doc, job_label, buckets=SECONDS_BUCKETS, registry=self.registry).labels(job)

        self.round = gauge("fedmq_round", "Round in progress (the next model version's round).")
        self.rounds_planned = gauge("fedmq_rounds_planned", "Model versions the job is to produce.")
        self.version = gauge("fedmq_model_version", "Version of the global model (one per aggregation).")
        self.accuracy = gauge("fedmq_accuracy", "Accuracy of the global model on the job's evaluation set.")
        self.loss = gauge("fedmq_loss", "Loss of the global model on the job's evaluation set.")
        self.slaves_online = gauge("fedmq_slaves_online", "Enrolled slaves online now.")
        self.slaves_enrolled = gauge("fedmq_slaves_enrolled", "Slaves enrolled in the job.")
        self.updated = gauge("fedmq_status_updated_timestamp_seconds",
                             "Unix time of the master's last status (its heartbeat: at least every 10 s).")
        self.accepted = counter("fedmq_updates_accepted", "Slave updates aggregated into a model version.")
        self.bytes_in = counter("fedmq_bytes_in", "Bytes of the slaves' updates the master received (up).")
        self.bytes_out = counter("fedmq_bytes_out", "Bytes the slaves received from the master (down), as they count them.")
        self.round_seconds = histogram("fedmq_round_seconds", "Duration of each round, start to new version.")
        self.aggregation_seconds = histogram("fedmq_aggregation_seconds",
                                             "Time the master spent aggregating the updates of a round.")
        self._snapshot = _StatusCounters(job)
        self.registry.register(self._snapshot)

    def start(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve http://ADDR:PORT/metrics on a background thread until `close`."""
        try:
            self._server, self._thread = prom.start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics port: cannot listen on {addr}:{port}: {exc.strerror}") from None

    def close(self) -> None:
        """Stop serving. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def on_status(self, status: Mapping[str, Any]) -> None:
        """A status JSON the master published (retained, at least every 10 s)."""
        for gauge, key in ((self.round, "round"), (self.rounds_planned, "rounds"), (self.version, "version"),
                           (self.accuracy, "last_accuracy"), (self.updated, "updated")):
            value = status.get(key)
            if _number(value):
                gauge.set(value)
        slaves = status.get("slaves")
        if isinstance(slaves, Mapping):
            enrolled = [s for s in slaves.values() if isinstance(s, Mapping) and s.get("enrolled")]
            self.slaves_enrolled.set(len(enrolled))
            self.slaves_online.set(sum(1 for s in enrolled if s.get("online")))
        self._snapshot.update(status)

    def on_metrics(self, row: Mapping[str, Any]) -> None:
        """A metrics JSON the master published: one per aggregation."""
        for counter, key in ((self.accepted, "updates"), (self.bytes_in, "bytes_up"), (self.bytes_out, "bytes_down")):
            value = row.get(key)
            if _number(value) and value >= 0:
                counter.inc(value)
        for histogram, key in ((self.round_seconds, "seconds"), (self.aggregation_seconds, "aggregation_seconds")):
            value = row.get(key)
            if _number(value) and value >= 0:
                histogram.observe(value)
        for gauge, key in ((self.accuracy, "accuracy"), (self.loss, "loss"), (self.version, "version")):
            value = row.get(key)
            if _number(value):
                gauge.set(value)


class _StatusCounters(Collector):
    """What the status carries as running totals (rejections by reason, duplicates) and
    the job's state: exported as they are, at scrape time."""

    def __init__(self, job: str) -> None:
        self.job = job
        self._lock = threading.Lock()
        self._rejected: dict[str, int] = {}
        self._duplicates = 0
        self._state: str | None = None

    def update(self, status: Mapping[str, Any]) -> None:
        rejected = status.get("rejected")
        with self._lock:
            if isinstance(rejected, Mapping):
                self._rejected = {str(k): v for k, v in rejected.items() if _number(v)}
            if _number(status.get("duplicates")):
                self._duplicates = status["duplicates"]
            if isinstance(status.get("state"), str):
                self._state = status["state"]

    def collect(self) -> Iterator[Any]:
        with self._lock:
            rejected, duplicates, state = dict(self._rejected), self._duplicates, self._state
        family = CounterMetricFamily("fedmq_updates_rejected", "Messages from slaves the master rejected, by reason.",
                                     labels=["job", "reason"])
        for reason, count in sorted(rejected.items()):
            family.add_metric([self.job, reason], count)
        yield family
        family = CounterMetricFamily("fedmq_duplicates", "Re-sent updates dropped as already received.",
                                     labels=["job"])
        family.add_metric([self.job], duplicates)
        yield family
        family = GaugeMetricFamily("fedmq_state", "1 for the state the job is in (waiting, training, finished).",
                                   labels=["job", "state"])
        if state is not None:
            family.add_metric([self.job, state], 1)
        yield family


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
