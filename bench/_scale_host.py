"""Host process of bench/scale.py: many lightweight fedmq slaves, one thread, one selector.

    python bench/_scale_host.py CONFIG.json

Each slave is what `fedmq slave run` is, minus the threads and the disk: its own
paho client (MQTT v5, persistent session, its own client id), its own Ed25519 key and
`Sealer`, an `Inbox` that trusts only the master's key, and a real `SlaveCore` whose
effects are carried out as `SlaveDaemon.apply` does -- Publish (sealed), Subscribe
(plus `/chunk/+` for retained topics), Train (the real `slave.core.run_training` on the
slave's tiny local data set; `"train": "synthetic"` replaces it with a constant delta),
SaveState (kept in memory here: a device's local state file is not what this measures).
Presence works as in the daemon: a signed retained "online" on connect and a signed
"offline" will, re-armed per connection.

Instead of one paho network thread (plus a loopback socket pair) per client, every
client's socket is registered with one `selectors` loop through paho's external-loop
hooks (on_socket_open / register_write ...; loop_read, loop_write, loop_misc).
Local training is queued and run between network events, a few milliseconds at a time.

Runs until SIGTERM (or `timeout`), then prints one JSON line of counters.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch.utils.data import TensorDataset

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Sealer, initial_seq
from fedmq.common.effects import SLAVE_EFFECTS, Interpreter, Log, Publish, SaveState, Subscribe, Train
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.keys import Identity, KeyRing, load_public_key, raw_public_bytes
from fedmq.common.topics import split_chunk_topic
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.slave.core import SlaveCore, run_training
from fedmq.slave.trainer import LocalResult

TRAIN_BUDGET = 0.02  # seconds of queued training per loop turn, then back to the network


class Host:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.broker = BrokerConfig(host=cfg["broker"]["host"], port=cfg["broker"]["port"])
        ring = KeyRing()
        ring.add("master", load_public_key(cfg["master_pub"]))
        self.ring = ring
        self.slaves: list[Slave] = []
        self.trainq: deque[tuple[Slave, Train]] = deque()
        self.stats: dict[str, Any] = {
            "slaves": 0, "connected": 0, "connects": 0, "disconnects": 0, "reconnects": 0, "messages_in": 0,
            "rejected": 0, "trained": 0, "updates_sent": 0, "train_seconds": 0.0, "warnings": 0,
            "disconnect_reasons": {}, "max_loop_gap_s": 0.0}
        self.reconnect_at: dict[Slave, float] = {}
        # round -> [first announcement seen, last update published], wall clock (time.time)
        self.round_marks: dict[int, list[float]] = {}
        self.stop = False
        for i, (name, seed_hex) in enumerate(cfg["slaves"]):
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
            self.slaves.append(Slave(self, Identity(name, key), cfg["first_index"] + i))
        self.stats["slaves"] = len(self.slaves)

    # ---------------------------------------------------------------- selector glue

    def on_socket_open(self, client: mqtt.Client, slave: Slave, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, slave)

    def on_socket_close(self, client: mqtt.Client, slave: Slave, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def on_socket_register_write(self, client: mqtt.Client, slave: Slave, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, slave)
        except KeyError:
            self.sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, slave)

    def on_socket_unregister_write(self, client: mqtt.Client, slave: Slave, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, slave)
        except (KeyError, ValueError):
            pass

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        end = time.monotonic() + self.cfg["timeout"]
        pending = deque(self.slaves)
        ramp = self.cfg.get("connect_per_turn", 25)
        self._next_misc = 0.0
        last_turn = time.monotonic()
        while not self.stop and time.monotonic() < end:
            turn = time.monotonic()
            self.stats["max_loop_gap_s"] = max(self.stats["max_loop_gap_s"], turn - last_turn)
            last_turn = turn
            for _ in range(min(ramp, len(pending))):
                pending.popleft().connect()
            timeout = 0.0 if (self.trainq or pending) else 0.2
            for n, (key, mask) in enumerate(self.sel.select(timeout)):
                slave: Slave = key.data
                if mask & selectors.EVENT_READ:
                    slave.client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    slave.client.loop_write()
                if n % 16 == 15:
                    self.misc()
            self.misc()
            budget_end = time.monotonic() + TRAIN_BUDGET
            while self.trainq and time.monotonic() < budget_end:
                slave, fx = self.trainq.popleft()
                slave.train(fx)
                self.misc()
        for s in self.slaves:
            if s.connected:
                s.client.disconnect()

    def misc(self) -> None:
        """Once a second: keepalive pings for every client (as paho's own thread would do),
        and due reconnects. Called between events too, so a long burst of work cannot
        starve the keepalive."""
        now = time.monotonic()
        if now < self._next_misc:
            return
        self._next_misc = now + 1.0
        for s in self.slaves:
            if s.started:
                s.client.loop_misc()
        for s, at in list(self.reconnect_at.items()):  # what Transport's paho thread does
            if now >= at:
                del self.reconnect_at[s]
                s.reconnect()

    def report(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {**self.stats, "train_seconds": round(self.stats["train_seconds"], 3), "pid": os.getpid(),
                "round_marks": {str(k): v for k, v in sorted(self.round_marks.items())},
                "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "max_rss_mb": round(ru.ru_maxrss / 1024, 1)}


class Slave:
    def __init__(self, host: Host, identity: Identity, index: int) -> None:
        cfg = host.cfg
        self.host = host
        self.name = identity.name
        self.scfg = SlaveConfig(slave_id=identity.name, job=cfg["job"], key=Path("-"), master_key=Path("-"),
                                data="bench:tiny", state_dir=Path("-"), broker=host.broker)
        g = torch.Generator().manual_seed(index)
        n, features, classes = cfg["samples"], cfg["features"], cfg["classes"]
        self.dataset = TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))
        self.sealer = Sealer(identity, cfg["job"], seq=initial_seq(time.time()))
        self.inbox = Inbox(host.ring, cfg["job"])
        self.core = SlaveCore(self.scfg, raw_public_bytes(identity.public_key), n,
                              {"update": ["delta"], "torch": torch.__version__, "machine": "bench"})
        self.presence_topic = self.scfg.topics.slave("presence", self.name)
        self.subs: dict[str, int] = {}
        self.connected = False
        self.started = False
        self.bytes_in = 0
        self.state: dict[str, Any] | None = None
        self.seed = index
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv5, userdata=self)
        c.on_socket_open = host.on_socket_open
        c.on_socket_close = host.on_socket_close
        c.on_socket_register_write = host.on_socket_register_write
        c.on_socket_unregister_write = host.on_socket_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.max_inflight_messages_set(self.broker_cfg.max_inflight)
        self.client = c
        self._online = b""
        self._interpret = Interpreter({
            Publish: self._publish, Subscribe: self._subscribe, SaveState: lambda fx: setattr(self, "state", fx.state),
            Train: lambda fx: self.host.trainq.append((self, fx)), Log: self._log,
        }, covers=SLAVE_EFFECTS)

    @property
    def broker_cfg(self) -> BrokerConfig:
        return self.host.broker

    def _presence(self, state: str) -> bytes:
        (payload,) = self.sealer.seal(self.presence_topic, M.PRESENCE, {"state": state, "version": self.core.version},
                                      now=time.time())
        return payload

    def _arm_presence(self) -> None:
        self._online = self._presence("online")
        self.client.will_set(self.presence_topic, self._presence("offline"), qos=1, retain=True)

    def connect(self) -> None:
        self.started = True
        self.apply(self.core.start(time.time(), None))
        self._arm_presence()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.broker_cfg.session_expiry
        self.client.connect(self.broker_cfg.host, self.broker_cfg.port, self.broker_cfg.keepalive,
                            clean_start=False, properties=props)

    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.host.stats["warnings"] += 1
            return
        self.connected = True
        self.host.stats["connected"] += 1
        self.host.stats["connects"] += 1
        for topic, qos in self.subs.items():
            client.subscribe(topic, qos)
        client.publish(self.presence_topic, self._online, qos=1, retain=True)
        self._arm_presence()

    def _on_disconnect(self, _client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        stats = self.host.stats
        if self.connected:
            stats["connected"] -= 1
        stats["disconnects"] += 1
        why = str(reason)
        stats["disconnect_reasons"][why] = stats["disconnect_reasons"].get(why, 0) + 1
        print(f"{time.time():.3f} {self.name}: disconnected: {why}", file=sys.stderr)
        self.connected = False
        if not self.host.stop:
            self.host.reconnect_at[self] = time.monotonic() + random.uniform(0.2, 0.6)

    def reconnect(self) -> None:
        self.host.stats["reconnects"] += 1
        try:
            self.client.reconnect()
        except OSError as exc:
            print(f"{self.name}: reconnect failed: {exc}", file=sys.stderr)
            self.host.reconnect_at[self] = time.monotonic() + random.uniform(1.0, 3.0)

    def _on_message(self, _client: mqtt.Client, _ud: Any, message: mqtt.MQTTMessage) -> None:
        self.host.stats["messages_in"] += 1
        self.bytes_in += len(message.payload)
        if not message.payload:
            return
        now = time.time()
        try:
            got = self.inbox.receive(split_chunk_topic(message.topic), message.payload, now, retained=bool(message.retain))
            if got is not None:
                if got.kind == M.ROUND:
                    mark = self.host.round_marks.setdefault(got.manifest.round, [now, 0.0])
                    mark[0] = min(mark[0], now)
                self.apply(self.core.on_message(got, now))
        except ProtocolError:
            self.host.stats["rejected"] += 1

    def apply(self, effects: list) -> None:
        self._interpret(effects)

    def _publish(self, fx: Publish) -> None:
        for payload in self.sealer.seal(fx.topic, fx.kind, fx.body, now=time.time(), version=fx.version, round=fx.round):
            self.client.publish(fx.topic, payload, qos=fx.qos, retain=fx.retain)
        if fx.kind == M.UPDATE:
            self.host.stats["updates_sent"] += 1
            mark = self.host.round_marks.setdefault(fx.round, [time.time(), 0.0])
            mark[1] = max(mark[1], time.time())

    def _subscribe(self, fx: Subscribe) -> None:
        topics = [fx.topic]
        if fx.topic.endswith(("/model", "/instruction", "/round")):
            topics.append(fx.topic + "/chunk/+")
        for t in topics:
            self.subs[t] = fx.qos
            if self.connected:
                self.client.subscribe(t, fx.qos)

    def _log(self, fx: Log) -> None:
        if fx.level != "info":
            self.host.stats["warnings"] += 1
            print(f"{self.name}: {fx.level}: {fx.message}", file=sys.stderr)

    def train(self, fx: Train) -> None:
        t = time.perf_counter()
        if self.host.cfg["train"] == "synthetic":
            result = LocalResult("delta", {k: torch.full_like(v, 1e-3) for k, v in fx.params.items()},
                                 len(self.dataset), {"train_loss": 0.0})
        else:
            result = run_training(self.core.instruction, fx.params, self.dataset, seed=self.seed * 1_000_003 + fx.round)
        self.host.stats["train_seconds"] += time.perf_counter() - t
        self.host.stats["trained"] += 1
        self.apply(self.core.on_trained(fx.round, fx.version, result, time.time(), bytes_in=self.bytes_in))


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    host = Host(cfg)

    def stop(*_a: Any) -> None:
        host.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        host.run()
    finally:
        print(json.dumps(host.report()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
