"""A relay with real processes and two Mosquittos: global master <- relay <- three devices, plus two direct slaves.

The central broker serves the global job ("digits"): its master and two slaves. The
site broker serves the site job ("digits-site-a"): the relay as its master and three
devices; it is bridged to the central broker (`fedmq broker bridge`), and the relay
reaches the upstream job through that bridge. The five data holders share the
reference workload's split five ways; the relay exchanges after every local round, so
the global model is FedAvg over all five. The relay is killed (SIGKILL) while a local
round holds updates it acknowledged, and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from fedmq.broker import start_broker
from fedmq.common.keys import Identity, write_identity
from fedmq.common.topics import Topics
from fedmq.common.transport import Inbound, Transport
from fedmq.common.workload import reference_split
from fedmq.demo import _PYTHON, LocalFleet, Watcher, to_toml
from fedmq.mosquitto_files import RelayBridge, render_bridge

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker]
SITE = "digits-site-a"


class JsonWatch:
    """The site job's retained status and its metrics rows, as mosquitto_sub shows them."""

    def __init__(self, broker, job: str) -> None:
        self.status: dict = {}
        self.rows: list[dict] = []
        topics = Topics(job)
        self.transport = Transport(broker, f"watch-{job}-{id(self)}", self._on, clean_start=True)
        self.transport.subscribe(topics.master("status"))
        self.transport.subscribe(topics.master("metrics"))
        self.transport.start()

    def _on(self, msg: Inbound) -> None:
        data = json.loads(msg.payload)
        if msg.topic.endswith("/status"):
            self.status = data
        elif not msg.retain:
            self.rows.append(data)

    def close(self) -> None:
        self.transport.stop()


def test_a_relay_behind_a_bridge_is_one_party_upstream_and_survives_kill_9(tmp_path, mosquitto_bin):
    central = start_broker("mosquitto", data_dir=tmp_path / "central")
    site = start_broker("mosquitto", data_dir=tmp_path / "site", extra_conf=render_bridge(
        RelayBridge("digits", "site-a", (central.host, central.port), tls=False)))
    split = reference_split(num_slaves=5)
    fleet = LocalFleet(tmp_path / "fleet", central.settings, slaves=2, rounds=30, job={
        "job": {"target_accuracy": 0.88},
        # the relay counts for three; its will must not close a round while it restarts
        "rounds": {"min_slaves": 3, "deadline": 120.0, "offline_grace": 60.0},
    }, slave_overrides={f"slave-0{i}": {"slave": {"data": f"reference:{i}/5"}} for i in range(2)})
    relay_dir = tmp_path / "relay"
    for d in ("keys", "allowlist", "logs"):
        (relay_dir / d).mkdir(parents=True)
    up_ident, down_ident = Identity.generate("site-a"), Identity.generate("master")
    write_identity(up_ident, relay_dir / "keys")
    (fleet.root / "private" / "allowlist" / "site-a.pub").write_bytes((relay_dir / "keys" / "site-a.pub").read_bytes())
    write_identity(down_ident, relay_dir / "keys")  # the site master's key (it signs as "master" there)
    devices = [f"dev-{i}" for i in range(3)]
    for d in devices:
        ident = Identity.generate(d)
        write_identity(ident, relay_dir / "keys")
        (relay_dir / "allowlist" / f"{d}.pub").write_bytes((relay_dir / "keys" / f"{d}.pub").read_bytes())
    (relay_dir / "relay.toml").write_text(to_toml({
        "job": {"id": SITE, "task": "digits"},
        "model": {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.1},
        "rounds": {"min_slaves": 3, "deadline": 120.0},
        "enrollment": {"mode": "allowlist", "keys": "allowlist"},
        "master": {"key": "keys/master.key", "state_dir": "state/site"},
        "broker": site.settings,
        "relay": {"id": "site-a", "key": "keys/site-a.key", "upstream_job": "digits",
                  "upstream_master_key": str(fleet.root / "keys" / "master.pub"), "state_dir": "state/upstream"},
        "upstream_broker": site.settings,  # through the bridge
    }))
    for i, d in enumerate(devices):
        (relay_dir / f"{d}.toml").write_text(to_toml({
            "slave": {"id": d, "job": SITE, "key": f"keys/{d}.key", "master_key": "keys/master.pub",
                      "data": f"reference:{2 + i}/5", "state_dir": f"state/{d}"},
            "broker": site.settings}))
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *argv: str) -> None:
        log = open(relay_dir / "logs" / f"{name}.log", "ab")
        procs[name] = subprocess.Popen([*_PYTHON, "-m", "fedmq", *argv], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=relay_dir)
        log.close()

    def log(name: str) -> str:
        return (relay_dir / "logs" / f"{name}.log").read_text(errors="replace")

    watch = Watcher(central.settings)
    local = JsonWatch(site.broker_config(), SITE)
    try:
        fleet.start_all()
        start("relay", "relay", "-c", "relay.toml")
        for d in devices:
            start(d, "slave", "run", "-c", f"{d}.toml")
        # a local round in progress that holds acknowledged updates: one device held back (SIGSTOP)
        wait_for(lambda: local.status.get("version", 0) >= 3, 150, "the site's third version")
        os.killpg(procs["dev-2"].pid, signal.SIGSTOP)
        wait_for(lambda: len(local.status.get("received", [])) == 2, 60, "a local round holding two updates")
        held = dict(local.status)
        procs["relay"].kill()  # kill -9
        procs["relay"].wait(timeout=10)
        start("relay", "relay", "-c", "relay.toml")
        os.killpg(procs["dev-2"].pid, signal.SIGCONT)
        assert fleet.procs["master"].wait(timeout=240) == 0, fleet.log("master")
        wait_for(lambda: watch.status.get("state") == "finished", 10, "the global master's final status")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        fleet.stop_all()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        watch.close()
        local.close()
        site.stop()
        central.stop()
    # the reference workload learns, all five data holders contributing
    rows = sorted(watch.rows, key=lambda r: r["version"])
    assert rows[-1]["accuracy"] >= 0.88, [r.get("accuracy") for r in rows]
    status = watch.status
    assert set(status["slaves"]) == {"slave-00", "slave-01", "site-a"}, "the devices are not the global master's"
    device_samples = sum(len(split.slave_dataset(i)) for i in (2, 3, 4))
    assert status["slaves"]["site-a"]["enrolled"] and status["slaves"]["site-a"]["samples"] == device_samples
    direct = sum(len(split.slave_dataset(i)) for i in (0, 1))
    for r in rows:  # every version: both direct slaves and the relay, which carried its devices' samples
        assert r["updates"] == 3 and any(u.startswith("site-a/") for u in r["update_ids"]), r
        assert r["samples"] == direct + device_samples, r
    # the relay was killed holding acknowledged local updates: they made the next local version
    assert "resumed from checkpoint" in log("relay") and "re-admitted" in log("relay"), log("relay")
    held_ids = {f"{s}/{held['round']}/{held['version']}" for s in held["received"]}
    made = [r for r in local.rows if r["round"] == held["round"]]
    assert made and held_ids <= set(made[-1]["update_ids"]), (held, made)
    # the site's status says what the relay does upstream
    assert local.status["relay"]["upstream"]["enrolled"] and local.status["relay"]["upstream"]["job"] == "digits"
