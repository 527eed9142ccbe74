"""`fedmq status` against a real Mosquitto holding retained status and liveness messages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from click.testing import CliRunner, Result

from fedmq.broker import BrokerHandle, free_port
from fedmq.cli import main

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


def status_json(job: str, **over) -> dict:
    return {"job": job, "state": "training", "version": 3, "round": 4, "rounds": 30, "last_accuracy": 0.75,
            "slaves": {"a": {"enrolled": True, "online": True}, "b": {"enrolled": True, "online": True}},
            "rejected": {"replay": 1}, "duplicates": 0, "updated": time.time(), **over}


@pytest.fixture
def retained(shared_mosquitto: BrokerHandle, transports) -> tuple[str, Callable[[str, str, dict], None]]:
    """A fresh prefix, and a function that keeps a retained JSON message on PREFIX/JOB/NAME."""
    prefix = f"t{time.time_ns()}"
    publisher = transports(shared_mosquitto, f"status-test-{prefix}", clean_start=True)
    assert publisher.wait_connected(10)

    def publish(job: str, name: str, value: dict) -> None:
        publisher.publish(f"{prefix}/{job}/{name}", json.dumps(value).encode(), qos=1, retain=True)
        assert publisher.flush(10)

    return prefix, publish


def status(broker: BrokerHandle, *args: str) -> Result:
    return CliRunner().invoke(main, ["status", "--broker", f"{broker.host}:{broker.port}", *args])


def test_every_job_in_one_look(shared_mosquitto: BrokerHandle, retained) -> None:
    prefix, publish = retained
    now = time.time()
    publish("digits", "status", status_json("digits"))
    publish("digits", "alive", {"job": "digits", "alive": True, "since": now - 50})
    publish("mnist", "status", status_json("mnist", version=9, round=10))
    publish("mnist", "alive", {"job": "mnist", "alive": False, "since": now - 50})  # its will
    publish("stale", "status", status_json("stale", updated=now - 120))
    publish("done", "status", status_json("done", state="finished", updated=now - 3600))
    publish("done", "alive", {"job": "done", "alive": False, "since": now - 3600})

    result = status(shared_mosquitto, "--prefix", prefix)
    assert result.exit_code == 3, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {"digits": "alive", "done": "finished", "mnist": "gone", "stale": "gone"}, result.stdout
    assert "the master of job mnist is gone" in result.stderr and "job stale is gone" in result.stderr
    assert "digits" not in result.stderr and "done" not in result.stderr

    result = status(shared_mosquitto, "--prefix", prefix, "--job", "digits", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["job"], row["round"], row["version"], row["accuracy"]) == ("digits", 4, 3, 0.75)
    assert (row["slaves_online"], row["slaves_enrolled"], row["rejected"]) == (2, 2, 1)

    result = status(shared_mosquitto, "--prefix", prefix, "--job", "absent")
    assert result.exit_code == 3 and "no job 'absent'" in result.stderr


def test_no_jobs_is_not_an_error(shared_mosquitto: BrokerHandle) -> None:
    result = status(shared_mosquitto, "--prefix", f"empty{time.time_ns()}")
    assert result.exit_code == 0 and "no jobs under" in result.stdout


def test_unreachable_broker_is_said_plainly() -> None:
    result = CliRunner().invoke(main, ["status", "--broker", f"127.0.0.1:{free_port()}", "--timeout", "3"])
    assert result.exit_code == 1
    assert result.stderr.startswith("fedmq status: cannot reach broker 127.0.0.1:") and "refused" in result.stderr
