"""Asynchronous training under churn: join late, drop out, crash, resume -- nothing lost.

Real Mosquitto (a fresh one per test, from the fixtures), real master and slave
processes (`LocalFleet`), faults injected from outside the way they happen in a
fleet: SIGKILL of slaves and of the master, a graceful broker restart with queued
messages in it, unclean disconnects. Each test checks the *outcome* (accuracy, the
job finishes) and the *bookkeeping*: the master's metrics rows carry the ids of the
updates each version was made of, and its final checkpoint keeps every row, so "no
update applied twice" and "every queued update applied once" are read off them.

Every wait is bounded, and so is every test (pytest-timeout).
"""

from __future__ import annotations

import queue
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.common.channel import Inbox
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import KeyRing
from fedmq.common.shell import read_cbor_file
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Inbound, Transport
from fedmq.common.workload import reference_split
from fedmq.demo import JOB, LocalFleet, Watcher

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]




class Recorder(Watcher):
    """A `Watcher` that also keeps every status version it saw, in arrival order, and
    calls `on_status` with each status (on its network thread)."""

    def __init__(self, broker: dict[str, Any],
                 on_status: Callable[[dict[str, Any]], None] = lambda status: None) -> None:
        self.status_versions: list[int] = []
        self.on_status = on_status
        super().__init__(broker)

    def _on(self, msg: Inbound) -> None:
        super()._on(msg)
        if msg.topic.endswith("/status") and "version" in self.status:
            self.status_versions.append(self.status["version"])
            self.on_status(self.status)

    @property
    def version(self) -> int:
        return self.status.get("version", 0)


def npz_shards(root: Path, slaves: int, slave_settings: dict[str, Any]) -> dict[str, Any]:
    """The reference split's shards (and test set) as .npz files, and the config
    overrides that point the fleet at them. Same data as ``reference:I/N``, but a
    slave that reads a file does not import scikit-learn: about a third of the CPU
    a slave (re)start costs, and these tests restart many."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    split = reference_split(num_slaves=slaves)
    datasets = {f"slave-{i:02d}": split.slave_dataset(i) for i in range(slaves)} | {"test": split.test_dataset()}
    for name, dataset in datasets.items():
        x, y = dataset.tensors
        np.savez(data / f"{name}.npz", x=x.numpy(), y=y.numpy())
    return {
        "job": {"master": {"eval": "../data/test.npz"}},
        "slave_overrides": {f"slave-{i:02d}": {"slave": {"data": f"../data/slave-{i:02d}.npz", **slave_settings}}
                            for i in range(slaves)},
    }


@pytest.fixture
def fleet_factory(mosquitto, tmp_path: Path) -> Iterator[Callable[..., tuple[LocalFleet, Recorder]]]:
    made: list[tuple[LocalFleet, Recorder]] = []

    def make(on_status: Callable[[dict[str, Any]], None] = lambda status: None, *, slaves: int,
             job: dict[str, Any], slave_settings: dict[str, dict[str, Any]] | None = None,
             **kwargs) -> tuple[LocalFleet, Recorder]:
        """A fleet whose slaves read .npz shards; `slave_settings` adds to every [slave]
        table (key "*") or to one slave's."""
        settings = slave_settings or {}
        files = npz_shards(tmp_path / "fleet", slaves, settings.get("*", {}))
        overrides = files["slave_overrides"]
        for name, extra in settings.items():
            if name != "*":
                overrides[name]["slave"].update(extra)
        fleet = LocalFleet(tmp_path / "fleet", mosquitto.settings, slaves=slaves,
                           job={**job, **files["job"]}, slave_overrides=overrides, **kwargs)
        watcher = Recorder(mosquitto.settings, on_status)
        made.append((fleet, watcher))
        return fleet, watcher

    yield make
    for fleet, watcher in made:
        fleet.stop_all()
        watcher.close()


def history(fleet: LocalFleet) -> list[dict[str, Any]]:
    """Every metrics row of the job, from the master's final checkpoint."""
    checkpoint = read_cbor_file(fleet.root / "state" / "master" / "checkpoint.cbor")
    assert checkpoint is not None
    return list(checkpoint["history"])


def check_bookkeeping(fleet: LocalFleet, watch: Recorder, rounds: int) -> list[dict[str, Any]]:
    """Versions 1..rounds, each once; no update in two versions; live rows agree with the checkpoint."""
    rows = history(fleet)
    assert [r["version"] for r in rows] == list(range(1, rounds + 1))
    applied = Counter(uid for r in rows for uid in r["update_ids"])
    twice = {uid: n for uid, n in applied.items() if n > 1}
    assert not twice, f"updates applied more than once: {twice}"
    assert all(len(r["update_ids"]) == r["updates"] for r in rows)
    by_version = {r["version"]: r for r in rows}
    live = [r["version"] for r in watch.rows]
    assert live == sorted(set(live)), f"metrics rows went backwards or repeated: {live}"
    for row in watch.rows:
        assert row["update_ids"] == by_version[row["version"]]["update_ids"], row["version"]
    statuses = watch.status_versions
    assert statuses == sorted(statuses), f"status version went backwards: {statuses}"
    return rows


def contributors(rows: list[dict[str, Any]]) -> Counter:
    return Counter(uid.split("/")[0] for r in rows for uid in r["update_ids"])


# ---------------------------------------------------------------- transport


@pytest.mark.timeout(60)
def test_drop_breaks_the_connection_uncleanly_and_comes_back(mosquitto, transports):
    """`Transport.drop`: the broker sends the will, the client reconnects after the
    pause, and what was published while it was away is delivered both ways."""
    seen: queue.Queue[Inbound] = queue.Queue()
    watcher = transports(mosquitto, "watcher", seen.put)
    watcher.subscribe("churn/presence")
    watcher.subscribe("churn/from-device")
    assert watcher.wait_connected(10)
    got: queue.Queue[Inbound] = queue.Queue()
    device = transports(mosquitto, "device", got.put, start=False)
    device.set_will("churn/presence", b"offline", qos=1, retain=True)
    device.subscribe("churn/to-device")
    device.start()
    assert device.wait_connected(10)
    device.publish("churn/presence", b"online", retain=True)
    assert seen.get(timeout=10).payload == b"online"

    assert device.drop(pause=1.5)
    started = time.monotonic()
    will = seen.get(timeout=10)
    assert (will.topic, will.payload) == ("churn/presence", b"offline")
    device.publish("churn/from-device", b"sent while away")  # queued by paho
    watcher.publish("churn/to-device", b"queued by the broker")  # for the persistent session
    wait_for(lambda: not device.connected, 5, "the drop to be noticed")
    wait_for(lambda: device.connected, 15, "the reconnect")
    assert time.monotonic() - started >= 1.0  # it waited its pause (give or take the detection)
    assert seen.get(timeout=10).payload == b"sent while away"
    assert got.get(timeout=10).payload == b"queued by the broker"


# ---------------------------------------------------------------- FedBuff under churn


@pytest.mark.timeout(480)
def test_fedbuff_reaches_target_while_slaves_are_killed_restarted_and_join_late(fleet_factory):
    """8 slaves start, 2 more join a quarter of the way in; all along, slaves are SIGKILLed
    and restarted at once (paced by model versions, at most 5 away at a time), and drop
    their connection now and then (`disconnect_rate`). Slaves train 8x slower than they
    could (`slowdown`), as devices do next to a server; a restart (Python, torch) then
    takes a few versions, not dozens."""
    rounds, planned_kills, max_away = 64, 12, 5
    fleet, watch = fleet_factory(slaves=10, rounds=rounds, job={
        "strategy": {"name": "fedbuff", "buffer_size": 4, "max_staleness": 6},
        "rounds": {"min_slaves": 8, "deadline": 5.0, "silence_timeout": 20.0},
    }, slave_settings={"*": {"slowdown": 8.0, "disconnect_rate": 0.05}})
    original, late = fleet.names[:8], fleet.names[8:]
    for name in original:
        fleet.start(name)
    fleet.start("master")
    rng = random.Random(1)
    kills: list[tuple[str, int]] = []  # (slave, version at the kill)
    restarts: list[tuple[str, int]] = []  # (slave, its log size when restarted)
    away: set[str] = set()  # restarted, not connected again yet
    joined = False
    wait_for(lambda: watch.version >= 1, 150, "the first version")
    end = time.monotonic() + 240
    while fleet.procs["master"].poll() is None and time.monotonic() < end:
        version = watch.version
        away = {name for name, offset in restarts if name in away
                and "connected to broker" not in log_tail(fleet, name, offset)}
        if not joined and version >= rounds // 4:
            for name in late:
                fleet.start(name)
            joined = True
        due = len(kills) < planned_kills and version >= 2 + len(kills) * (rounds * 7 // 10) // planned_kills
        up = [n for n in original if n not in away]
        if due and len(away) < max_away and up:
            victim = rng.choice(up)
            fleet.signal(victim, signal.SIGKILL)
            kills.append((victim, version))
            restarts.append((victim, log_size(fleet, victim)))
            away.add(victim)
            fleet.start(victim)
        time.sleep(0.1)
    assert fleet.procs["master"].wait(timeout=30) == 0, fleet.log("master")
    wait_for(lambda: watch.status.get("state") == "finished", 10, "the final status")

    rows = check_bookkeeping(fleet, watch, rounds)
    assert len(kills) >= 10, kills
    final = rows[-1]["accuracy"]
    assert final >= 0.88, [round(r["accuracy"], 3) for r in rows]
    by_slave = contributors(rows)
    assert all(by_slave[name] > 0 for name in late), by_slave  # the late joiners count
    # Restarted slaves come back (the retained instruction and model) and train again,
    # but for those killed too near the end to be back in time.
    back = sum("sent delta update" in log_tail(fleet, name, offset) for name, offset in restarts)
    assert back >= len(restarts) - max_away, (kills, back)
    drops = sum(fleet.log(name).count("dropping the broker connection") for name in fleet.names)
    assert drops > 0
    print(f"\nfedbuff churn: final accuracy {final:.4f}, {len(kills)} kills (slave, version) {kills}, "
          f"{back} restarted slaves trained again, {drops} unclean disconnects; updates used per slave "
          f"{dict(sorted(by_slave.items()))}, rejected {watch.status.get('rejected')}, "
          f"staleness max {max(r['staleness_max'] for r in rows)}")


def log_size(fleet: LocalFleet, name: str) -> int:
    path = fleet.root / "logs" / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def log_tail(fleet: LocalFleet, name: str, offset: int) -> str:
    with open(fleet.root / "logs" / f"{name}.log", "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# ---------------------------------------------------------------- master crashes


@pytest.mark.timeout(420)
def test_master_killed_twice_never_regresses_and_applies_each_update_once(fleet_factory):
    """The master is SIGKILLed twice while its journal holds buffered updates; each
    restart resumes from the checkpoint plus the journal."""
    rounds = 30
    fleet, watch = fleet_factory(slaves=5, rounds=rounds, job={
        "strategy": {"name": "fedbuff", "buffer_size": 3, "max_staleness": 6},
        "rounds": {"min_slaves": 5, "deadline": 5.0, "silence_timeout": 30.0},
    }, slave_settings={"*": {"slowdown": 8.0}})
    fleet.start_all()
    journal = fleet.root / "state" / "master" / "journal.cbor"
    journaled: set[str] = set()
    for n, at in enumerate((8, 18)):
        wait_for(lambda: watch.version >= at, 150, f"version {at}")
        # Kill it while updates are buffered: journaled (and acked) but not in a version yet.
        wait_for(lambda: journal.exists() and journal.stat().st_size > 0, 30, "a journaled update")
        fleet.signal("master", signal.SIGKILL)
        journaled |= journal_ids(journal)
        fleet.start("master")
        wait_for(lambda: fleet.log("master").count("resumed from checkpoint") == n + 1, 90, f"restart {n + 1}")
    assert fleet.procs["master"].wait(timeout=150) == 0, fleet.log("master")
    wait_for(lambda: watch.status.get("state") == "finished", 10, "the final status")

    rows = check_bookkeeping(fleet, watch, rounds)
    assert journaled, "the journal was empty at both kills: nothing was recovered"
    assert "re-admitted" in fleet.log("master")
    applied = Counter(uid for r in rows for uid in r["update_ids"])
    # Journaled updates survive the crash and count exactly once (none got too stale:
    # the model does not move while the master is down).
    assert {uid: applied[uid] for uid in journaled} == {uid: 1 for uid in journaled}
    assert watch.status["version"] == rounds and watch.status["state"] == "finished"
    # No reset, no corrupted model (FedBuff on 3 of 5 non-IID shards per version is noisy).
    assert rows[-1]["accuracy"] >= 0.7, [round(r["accuracy"], 3) for r in rows]
    print(f"\nmaster restarts: {len(journaled)} journaled update(s) recovered, "
          f"duplicates dropped {watch.status.get('duplicates')}, final accuracy {rows[-1]['accuracy']:.4f}")


def journal_ids(path: Path) -> set[str]:
    from fedmq.common.shell import JournalFile

    journal = JournalFile(path)
    try:
        return {record["update_id"] for record in journal.records()}
    finally:
        journal.close()


# ---------------------------------------------------------------- broker restart


class UpdateSpy:
    """Subscribes to every slave's update topic and decodes the update ids: what the
    broker accepted (and so queued for the master's persistent session)."""

    def __init__(self, broker: dict[str, Any], keys: Path) -> None:
        self.inbox = Inbox(KeyRing.from_dir(keys), JOB)
        self.seen: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.transport = Transport(BrokerConfig(**broker), f"spy-{time.time_ns()}", self._on, clean_start=True)
        self.transport.subscribe(f"fedmq/{JOB}/update/+")
        self.transport.start()

    def _on(self, msg: Inbound) -> None:
        try:
            received = self.inbox.receive(msg.topic, msg.payload, time.time())
        except ProtocolError:
            return
        if received is not None:
            with self._lock:
                self.seen.append((time.monotonic(), received.body["update_id"]))

    def since(self, t: float) -> set[str]:
        with self._lock:
            return {uid for at, uid in self.seen if at >= t}

    def close(self) -> None:
        self.transport.stop()


@pytest.mark.timeout(420)
def test_updates_held_by_the_broker_survive_its_restart_and_apply_once(fleet_factory, mosquitto):
    """Updates the broker holds for the master's persistent session when it is stopped
    (gracefully: it writes mosquitto.db) are delivered after its restart and applied
    exactly once. Two ways of holding them:

    1. in flight: the master is frozen (SIGSTOP) right after version 4; the broker has
       already written the slaves' updates into its socket, unacknowledged. After the
       restart the master reads them from that socket *and* gets them again from the
       broker's database (MQTT dup): one must be dropped.
    2. queued only: the master is killed (SIGKILL) right after version 8 and the slaves
       frozen once they have sent their updates, so the broker's database is the only
       copy (slaves re-send a pending update when its round is announced again).
    """
    rounds = 14
    phase: dict[int, float] = {}  # version -> when the master was stopped
    fleet: LocalFleet | None = None

    def on_status(status: dict[str, Any]) -> None:
        # The status comes last after a new version, once the next round is announced.
        if fleet is not None and status["version"] in (4, 8) and status["version"] not in phase:
            fleet.signal("master", signal.SIGSTOP if status["version"] == 4 else signal.SIGKILL)
            phase[status["version"]] = time.monotonic()

    fleet, watch = fleet_factory(on_status=on_status, slaves=4, rounds=rounds, job={
        "strategy": {"name": "fedbuff", "buffer_size": 2, "max_staleness": 8},
        "rounds": {"min_slaves": 4, "deadline": 10.0, "silence_timeout": 60.0},
    }, slave_settings={"*": {"slowdown": 8.0}})
    slaves = fleet.names
    spy = UpdateSpy(mosquitto.settings, fleet.root / "keys")
    held: dict[int, set[str]] = {}
    try:
        fleet.start_all()
        for stop_at in (4, 8):
            wait_for(lambda: stop_at in phase, 150, f"version {stop_at}")
            # The master may have made one more version before the signal landed. Every
            # slave trains once on the newest version it got and publishes (update ids end
            # in the base version): the spy sees what the broker accepted, and the stopped
            # master acknowledges none of it.
            def on_newest() -> tuple[int, set[str]]:
                ids = spy.since(0.0)
                newest = max([stop_at] + [int(u.rsplit("/", 1)[1]) for u in ids])
                return newest, {u for u in ids if u.endswith(f"/{newest}")}

            wait_for(lambda: {u.split("/")[0] for u in on_newest()[1]} == set(slaves), 60,
                     f"an update on the newest version from every slave (master stopped at {stop_at})")
            version, held[version] = on_newest()
            if stop_at == 8:
                for name in slaves:
                    fleet.signal(name, signal.SIGSTOP)
            mosquitto.stop()
            mosquitto.start()
            if stop_at == 4:
                fleet.signal("master", signal.SIGCONT)
            else:
                fleet.start("master")
                journal = fleet.root / "state" / "master" / "journal.cbor"
                # Received (journaled, or already in a version), before the slaves can re-send them.
                wait_for(lambda: held[version] <= {u for r in watch.rows for u in r["update_ids"]} | journal_ids(journal),
                         90, "the queued updates to reach the master")
                for name in slaves:
                    fleet.signal(name, signal.SIGCONT)
        assert fleet.procs["master"].wait(timeout=150) == 0, fleet.log("master")
    finally:
        spy.close()
    wait_for(lambda: watch.status.get("state") == "finished", 20, "the final status")

    rows = check_bookkeeping(fleet, watch, rounds)
    applied = Counter(uid for r in rows for uid in r["update_ids"])
    assert len(held) == 2, held
    for version, ids in held.items():
        assert len(ids) == len(slaves) and {uid: applied[uid] for uid in ids} == {uid: 1 for uid in ids}, (version, ids)
    log = fleet.log("master")
    # The master's session came back from mosquitto.db both times. Whether phase 1 also
    # had updates in flight in the frozen master's socket (then the broker's MQTT-dup
    # copies are dropped as already received) depends on timing the test cannot force;
    # either way each held update was applied exactly once (checked above).
    assert log.count("session resumed") >= 2
    (first, second) = held.values()
    print(f"\nbroker restarts: held updates {sorted(first)} (in flight) and {sorted(second)} (queued) "
          f"each applied once; duplicates dropped {watch.status.get('duplicates')}")


# ---------------------------------------------------------------- synchronous rounds


@pytest.mark.timeout(360)
def test_sync_round_completes_when_a_participant_is_killed_mid_round(fleet_factory, mosquitto):
    """FedAvg, 4 slaves, quorum = all; slave-03 is slow (slowdown) and is SIGKILLed
    once the others have answered round 2: its will closes the round long before the
    deadline. Restarted, it rejoins and contributes again."""
    deadline, rounds = 60.0, 5
    paused = threading.Event()
    fleet: LocalFleet | None = None

    def pause_after_round_2(status: dict[str, Any]) -> None:
        if status["version"] == 2 and fleet is not None and not paused.is_set():
            fleet.signal("master", signal.SIGSTOP)  # round 3 is already announced, without slave-03
            paused.set()

    fleet, watch = fleet_factory(on_status=pause_after_round_2, slaves=4, rounds=rounds,
                                 job={"rounds": {"min_slaves": 4, "deadline": deadline}},
                                 slave_settings={"slave-03": {"slowdown": 20.0}})
    spy = UpdateSpy(mosquitto.settings, fleet.root / "keys")
    try:
        fleet.start_all()
        others = {f"slave-0{i}/2/1" for i in range(3)}  # update ids: slave/round/base version
        wait_for(lambda: others <= spy.since(0.0), 150, "round 2's updates from all but slave-03")
        assert "slave-03/2/1" not in spy.since(0.0), "slave-03 was not slow enough to be killed mid-round"
        killed = time.monotonic()
        fleet.signal("slave-03", signal.SIGKILL)
        wait_for(paused.is_set, deadline / 2, "round 2 to close without slave-03")
        closed_after = time.monotonic() - killed
    finally:
        spy.close()
    row = next(r for r in watch.rows if r["version"] == 2)
    assert sorted(row["update_ids"]) == sorted(others), row
    assert row["seconds"] < deadline / 2, row
    assert "slave-03 is offline" in fleet.log("master")

    # Back before round 4 starts (the master waits, frozen), slave-03 takes part again.
    fleet.start("slave-03")
    wait_for(lambda: fleet.log("slave-03").count("connected to broker") >= 2, 90, "slave-03 to reconnect")
    time.sleep(0.5)
    fleet.signal("master", signal.SIGCONT)
    assert fleet.procs["master"].wait(timeout=150) == 0, fleet.log("master")
    rows = check_bookkeeping(fleet, watch, rounds)
    back = [r["version"] for r in rows if any(u.startswith("slave-03/") for u in r["update_ids"])]
    assert any(v > 3 for v in back), rows
    print(f"\nsync kill: round 2 closed {closed_after:.1f} s after the kill (deadline {deadline:.0f} s); "
          f"updates per version {[r['updates'] for r in rows]}")
