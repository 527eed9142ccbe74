"""`fedmq status`: one look at every job on a broker, from its masters' retained messages.

Each master keeps its JSON status (`PREFIX/JOB/status`, republished at least every
10 s, `updated` being the heartbeat) and its liveness (`PREFIX/JOB/alive`, whose MQTT
will says `"alive": false`) retained on the broker. Subscribing to both for every job
hands them all over at once; the command reads until no new one has come for a short
quiet period, prints one line per job, and exits non-zero if a master is gone, so it
serves both a person and a cron or Nagios-style check.
"""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import click

from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.topics import DEFAULT_PREFIX, Topics, check_id, every_job, job_of
from fedmq.common.transport import Inbound, Transport

from .errors import user_errors
from .monitor import tool_logger
from .options import broker_options

#: A master whose status is older than this is gone (docs/OPERATIONS.md; it republishes every 10 s).
STALE_AFTER = 30.0
#: Seconds without a new message after which every retained one has arrived.
QUIET = 1.0
EXIT_UNREACHABLE = 1
EXIT_GONE = 3
TOP_REASONS = 3


class BrokerUnreachable(Exception):
    """No accepted connection to the broker within the timeout; the message says why."""


def collect(broker: BrokerConfig, prefix: str, job: str | None, timeout: float,
            quiet: float = QUIET) -> dict[str, dict[str, Any]]:
    """job -> {"status": ..., "alive": ...}: the retained (and any newer) messages.

    Stops `quiet` seconds after the last message, or `timeout` seconds after the
    connection at the latest. Raises BrokerUnreachable if it cannot connect.
    """
    inbox: queue.Queue[Inbound] = queue.Queue()
    transport = Transport(broker, f"fedmq-status-{time.time_ns()}", inbox.put, clean_start=True,
                          logger=tool_logger("fedmq.status", show=False))
    for name in ("status", "alive"):
        transport.subscribe(Topics(job, prefix).master(name) if job else every_job(name, prefix), qos=1)
    transport.start()
    try:
        if not transport.wait_connected(timeout):
            raise BrokerUnreachable(transport.last_error or
                                    f"no MQTT answer from {broker.host}:{broker.port} within {timeout:g} s: "
                                    f"is it an MQTT {'TLS ' if broker.uses_tls else ''}listener?")
        jobs: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < min(end, last + quiet):
            try:
                msg = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            last = time.monotonic()
            parsed = job_of(msg.topic, prefix)
            if parsed is None or not msg.payload:
                continue
            try:
                value = json.loads(msg.payload)
            except ValueError:
                value = {"error": "not JSON"}
            jobs.setdefault(parsed[0], {})[parsed[1]] = value if isinstance(value, dict) else {"error": "not a map"}
        return jobs
    finally:
        transport.stop()


def summarize(job: str, status: dict[str, Any] | None, alive: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """What `fedmq status` says about one job, and whether its master is gone."""
    status = status or {}
    slaves = status.get("slaves") if isinstance(status.get("slaves"), dict) else {}
    enrolled = [s for s in slaves.values() if isinstance(s, dict) and s.get("enrolled")]
    rejected = {str(k): v for k, v in (status.get("rejected") or {}).items() if isinstance(v, int)}
    updated = status.get("updated")
    age = round(now - updated, 1) if isinstance(updated, (int, float)) else None
    state = status.get("state")
    if state == "finished":
        master, why = "finished", None
    elif alive is not None and alive.get("alive") is False:
        master, why = "gone", "its will or clean stop says alive: false"
    elif age is None:
        master, why = ("starting", None) if alive and alive.get("alive") else ("gone", "no status")
    elif age > STALE_AFTER:
        master, why = "gone", f"status not updated for {age:.0f} s"
    else:
        master, why = "alive", None
    return {
        "job": job, "master": master, "gone": master == "gone", "why": why, "state": state,
        "round": status.get("round"), "rounds": status.get("rounds"), "version": status.get("version"),
        "accuracy": status.get("last_accuracy"),
        "slaves_online": sum(1 for s in enrolled if s.get("online")), "slaves_enrolled": len(enrolled),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))),
        "age_seconds": age, "alive_since": (alive or {}).get("since"),
    }


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned table, one line per job."""
    head = ("JOB", "MASTER", "STATE", "ROUND", "VERSION", "ACCURACY", "SLAVES", "REJECTED", "AGE")
    lines = [head]
    for r in rows:
        top = list(r["rejected_by_reason"].items())[:TOP_REASONS]
        rejected = str(r["rejected"]) + (f" ({', '.join(f'{k} {v}' for k, v in top)})" if top else "")
        lines.append((
            r["job"], r["master"], _text(r["state"]),
            f"{_text(r['round'])}/{_text(r['rounds'])}", _text(r["version"]),
            "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
            f"{r['slaves_online']}/{r['slaves_enrolled']} online", rejected,
            "-" if r["age_seconds"] is None else f"{max(0.0, r['age_seconds']):.0f}s",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


@click.command()
@broker_options
@click.option("--job", help="Only this job (default: every job under the prefix).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of jobs instead of a table.")
@click.option("--timeout", type=click.FloatRange(0.5, 300), default=10.0, show_default=True,
              help="Seconds to wait for the broker and its retained messages.")
@user_errors
def status(broker: BrokerConfig, job: str | None, prefix: str, as_json: bool, timeout: float) -> None:
    """Where every job on the broker stands: state, round, version, accuracy, slaves
    online/enrolled, rejected messages (total and top reasons), age of the status.

    Exit status: 0 every master is alive (or its job finished); 3 a master is gone
    (its liveness says alive false, or its status is older than 30 s), or --job names
    a job without status; 1 the broker cannot be reached or refused the login;
    2 a bad option.
    """
    if job is not None:
        check_id(job, "--job")
    Topics("x", prefix)  # checks the prefix
    try:
        jobs = collect(broker, prefix, job, timeout)
    except BrokerUnreachable as exc:
        click.echo(f"fedmq status: {exc}", err=True)
        raise SystemExit(EXIT_UNREACHABLE) from None
    now = time.time()
    rows = [summarize(name, seen.get("status"), seen.get("alive"), now) for name, seen in sorted(jobs.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(render(rows))
    if job is not None and not rows:
        click.echo(f"fedmq status: no job {job!r} under {prefix}/ on {broker.host}:{broker.port}", err=True)
        raise SystemExit(EXIT_GONE)
    if not rows and not as_json:
        click.echo(f"no jobs under {prefix}/ on {broker.host}:{broker.port}")
    gone = [r for r in rows if r["gone"]]
    for r in gone:
        click.echo(f"fedmq status: the master of job {r['job']} is gone: {r['why']}", err=True)
    if gone:
        raise SystemExit(EXIT_GONE)
