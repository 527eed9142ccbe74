"""Sharded aggregation with real processes: a root, two workers (shared subscription), four slaves, Mosquitto.

A capture client subscribes to every update and model of the job (not shared: it
sees them all), so each version the root published is checked against what a single
master makes of the same updates: the strategy's `aggregate` over exactly the
updates the root's metrics name. One worker is killed (SIGKILL) right after it
reported updates it acknowledged, and restarted: it must hold them again from its
journal, and the versions must still be exact.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedmq.common import messages as M
from fedmq.common.channel import Inbox
from fedmq.common.keys import Identity, KeyRing, write_identity
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.tensors import decode_state_dict
from fedmq.common.topics import Topics, split_chunk_topic
from fedmq.common.transport import Inbound, Transport
from fedmq.demo import _PYTHON, LocalFleet, Watcher

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]


class Capture:
    """Every update and model of the job, verified and decoded (a plain subscriber)."""

    def __init__(self, broker, keys: Path) -> None:
        self.inbox = Inbox(KeyRing.from_dir(keys), "digits")
        self.updates: dict[str, ClientUpdate] = {}
        self.models: dict[int, dict[str, torch.Tensor]] = {}
        topics = Topics("digits")
        self.transport = Transport(broker, f"capture-{id(self)}", self._on, clean_start=True)
        for f in (topics.slaves("update"), topics.master("model"), topics.master("model") + "/chunk/+"):
            self.transport.subscribe(f)
        self.transport.start()
        assert self.transport.wait_connected(10)

    def _on(self, msg: Inbound) -> None:
        if not msg.payload:
            return
        got = self.inbox.receive(split_chunk_topic(msg.topic), msg.payload, time.time(), retained=msg.retain)
        if got is None:
            return
        tensors = decode_state_dict(got.body["tensors"])
        if got.kind == M.UPDATE:
            b = got.body
            self.updates[b["update_id"]] = ClientUpdate(got.sender, b["kind"], tensors, b["samples"], b["base_version"])
        elif got.kind == M.MODEL:
            self.models[got.manifest.version] = tensors

    def close(self) -> None:
        self.transport.stop()


def test_two_workers_make_what_one_master_would_even_when_one_is_killed(mosquitto, tmp_path):
    fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, slaves=4, rounds=5, job={
        "rounds": {"min_slaves": 4, "deadline": 120.0},
        "shard": {"workers": ["w0", "w1"], "keys": "../private/workers", "master_pub": "../keys/master.pub"},
    }, slave_overrides={"slave-03": {"slave": {"slowdown": 6.0}}})  # a window between tallies and the collect
    workers = fleet.root / "private" / "workers"
    workers.mkdir()
    for w in ("w0", "w1"):
        write_identity(Identity.generate(w), workers)
    procs: dict[str, subprocess.Popen] = {}

    def start_worker(name: str) -> None:
        log = open(fleet.root / "logs" / f"{name}.log", "ab")
        procs[name] = subprocess.Popen([*_PYTHON, "-m", "fedmq", "worker", "-c", str(fleet.configs["master"]),
                                        "--id", name], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=fleet.root)
        log.close()

    capture = Capture(mosquitto.broker_config(), fleet.root / "keys")
    watch = Watcher(mosquitto.settings)
    try:
        start_worker("w0")
        start_worker("w1")
        fleet.start_all()
        # w1 reports (tallies) updates of round 2 it acknowledged: kill it there
        wait_for(lambda: "round 2: tallied" in fleet.log("w1"), 180, "w1's tally in round 2")
        procs["w1"].kill()
        procs["w1"].wait(timeout=10)
        start_worker("w1")
        assert fleet.procs["master"].wait(timeout=180) == 0, fleet.log("master")
        wait_for(lambda: watch.status.get("state") == "finished", 10, "final status")
        assert "journal:" in fleet.log("w1") and "held again" in fleet.log("w1"), fleet.log("w1")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        fleet.stop_all()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        capture.close()
        watch.close()
    rows = sorted(watch.rows, key=lambda r: r["version"])
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["updates"] == 4 for r in rows), rows  # every slave, every round: nothing lost
    # each version is what a single master makes of the same updates (FedAvg over update_ids)
    strategy = make_strategy({"name": "fedavg"}, gradient_lr=0.1)
    assert 0 in capture.models
    for r in rows:
        v = r["version"]
        updates = [capture.updates[uid] for uid in r["update_ids"]]
        expected = strategy.aggregate(capture.models[v - 1], updates, v - 1)
        got = capture.models[v]
        assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6) for k in expected), f"version {v}"
    # the root never read an update: the workers did, each a share
    assert "tallied" in fleet.log("w0") and "partial sum" in fleet.log("w0")
    assert "partial sum of w1" in fleet.log("master") and "partial sum of w0" in fleet.log("master")
