"""Federated training end to end: real Mosquitto, real master and slave processes.

These are the few process-level tests (each starts several Python processes that
import torch), so each one checks several things about one run.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.common.shell import read_cbor_file
from fedmq.demo import LocalFleet, Watcher

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]




@pytest.fixture
def fleet_factory(mosquitto, tmp_path: Path) -> Iterator[Callable[..., tuple[LocalFleet, Watcher]]]:
    made: list[tuple[LocalFleet, Watcher]] = []

    def make(**kwargs) -> tuple[LocalFleet, Watcher]:
        fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, **kwargs)
        watcher = Watcher(mosquitto.settings)
        made.append((fleet, watcher))
        return fleet, watcher

    yield make
    for fleet, watcher in made:
        fleet.stop_all()
        watcher.close()


def finished(fleet: LocalFleet, timeout: float) -> int:
    return fleet.procs["master"].wait(timeout=timeout)


def test_four_slaves_learn_while_unenrolled_and_declining_slaves_are_kept_out(fleet_factory):
    fleet, watch = fleet_factory(
        slaves=6, rounds=20, not_allowed=("slave-04",),
        slave_overrides={"slave-05": {"slave": {"tasks": ["speech"]}}},
        job={"rounds": {"min_slaves": 4}},
    )
    fleet.start_all()
    assert finished(fleet, 180) == 0, fleet.log("master")
    wait_for(lambda: watch.status.get("state") == "finished", 10, "final status")
    status = watch.status
    assert status["version"] == 20
    assert watch.rows[-1]["accuracy"] >= 0.85, watch.rows
    # the slave whose key is not in the allowlist: ignored, and the status says so
    assert "slave-04" in status["not_enrolled"]
    assert not status["slaves"].get("slave-04", {}).get("enrolled")
    assert all(row["updates"] <= 4 for row in watch.rows)
    # the slave that cannot serve the task declined, the master recorded why, it got no parameters
    assert "speech" in status["slaves"]["slave-05"]["declined"]
    assert "declining instruction" in fleet.log("slave-05")
    assert "model version" not in fleet.log("slave-05")
    # the retained status is plain JSON, readable by mosquitto_sub
    assert json.loads(json.dumps(status)) == status


def test_gradient_mode_converges(fleet_factory):
    fleet, watch = fleet_factory(slaves=4, rounds=30, job={"job": {"update": "gradient"}, "train": {"lr": 1.0}})
    fleet.start_all()
    assert finished(fleet, 180) == 0, fleet.log("master")
    accs = [row["accuracy"] for row in watch.rows]
    assert len(accs) == 30 and accs[-1] >= 0.8, accs
    assert "sent gradient update" in fleet.log("slave-00")


def test_silent_slave_rounds_complete_at_the_deadline(fleet_factory):
    fleet, watch = fleet_factory(slaves=3, rounds=4, job={"rounds": {"deadline": 3.0}})
    fleet.start_all()
    wait_for(lambda: watch.status.get("version", 0) >= 1, 120, "the first aggregation")
    fleet.signal("slave-02", signal.SIGSTOP)  # alive for the broker, silent for the master
    assert finished(fleet, 120) == 0, fleet.log("master")
    late = [row for row in watch.rows if row["version"] >= 3]
    assert late and all(row["updates"] == 2 and row["seconds"] >= 3.0 for row in late), watch.rows
    assert watch.status["version"] == 4


def test_master_restart_resumes_from_checkpoint(fleet_factory):
    fleet, watch = fleet_factory(slaves=3, rounds=10)
    fleet.start_all()
    wait_for(lambda: watch.status.get("version", 0) >= 3, 120, "version 3")
    fleet.signal("master", signal.SIGKILL)
    before = watch.status["version"]
    fleet.start("master")
    wait_for(lambda: "resumed from checkpoint" in fleet.log("master"), 60, "the restarted master")
    assert finished(fleet, 120) == 0, fleet.log("master")
    versions = [row["version"] for row in watch.rows]
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions  # never backwards
    assert min(v for v in versions if v > before) > before  # no reset to an older version
    # The durable record: every version once, in order. (A kill between a checkpoint and
    # its metrics leaves one version's live row unseen; the checkpoint still holds it.)
    history = read_cbor_file(fleet.root / "state" / "master" / "checkpoint.cbor")["history"]
    assert [row["version"] for row in history] == list(range(1, 11))
    assert watch.status["version"] == 10 and watch.status["state"] == "finished"
