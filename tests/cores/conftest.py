"""An in-memory message bus that runs master and slave cores with real signing, no broker.

Effects are carried out the way the daemons do (sealing with Sealer, verifying with
Inbox, training synchronously), with MQTT's retained-message and topic-filter rules,
so the cores' logic is tested end to end in one process and in milliseconds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.effects import (Ack, Checkpoint, Finish, Interpreter, Journal, Log, Publish, PublishJson,
                                  SaveState, Subscribe, Train, Trust)
from fedmq.common.errors import ProtocolError
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.jobconfig import JobConfig, RoundPolicy, SlaveConfig, TrainSettings
from fedmq.common.keys import Identity, KeyRing, public_key_from_raw, raw_public_bytes
from fedmq.common.layout import Layout
from fedmq.master.core import MasterCore
from fedmq.master.job import make_job_strategy
from fedmq.master.jobmodel import job_model
from fedmq.slave.core import SlaveCore, run_training


def topic_matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


@dataclass
class Node:
    name: str
    sealer: Sealer
    inbox: Inbox
    core: Any
    subs: list[str] = field(default_factory=list)
    dataset: Any = None
    alive: bool = True


class Bus:
    """Delivers published payloads to subscribed nodes; keeps retained messages per topic."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.retained: dict[str, list[bytes]] = {}
        self.queue: list[tuple[str, list[bytes], bool]] = []
        self.effects: dict[str, list[Any]] = {}
        self.json: dict[str, Any] = {}  # the last JSON message per topic
        self.json_log: list[PublishJson] = []  # every one, in order
        self.rejections: list[tuple[str, str]] = []
        self.now = 1000.0
        self.finished = False
        self.silent: set[str] = set()  # nodes whose local training never returns (hung/crashed mid-round)
        # Simulated seconds each node's local training takes; None: training is instant.
        self.train_time: dict[str, float] | None = None
        # What a Train effect yields: trainer(node, Train) -> LocalResult. None: real local
        # training (run_training on the node's dataset); a fake one keeps big fleets cheap.
        self.trainer: Callable[[Node, Train], Any] | None = None
        self._training: list[tuple[float, int, str, Any]] = []  # heap of (finish, seq, node, Train)

    def add(self, node: Node) -> None:
        self.nodes[node.name] = node
        self.effects[node.name] = []

    def run(self, name: str, effects: list[Any]) -> None:
        self.effects[name].extend(effects)
        self._interpreter(name)(effects)

    def _interpreter(self, name: str) -> Interpreter:
        """Effects carried out as the daemons do; those a daemon keeps to itself (logs,
        acks, files) are recorded in `effects` only."""
        node = self.nodes[name]
        return Interpreter({
            Publish: lambda fx: self._publish(node, fx),
            PublishJson: lambda fx: (self.json.__setitem__(fx.topic, fx.data), self.json_log.append(fx)),
            Subscribe: lambda fx: self._subscribe(node, fx),
            Train: lambda fx: self._train(node, fx),
            Trust: lambda fx: node.inbox.keyring.add(fx.name, public_key_from_raw(fx.public_key)),
            Finish: lambda fx: setattr(self, "finished", True),
        }, ignore={Log, Ack, Journal, Checkpoint, SaveState})

    def _publish(self, node: Node, fx: Publish) -> None:
        payloads = node.sealer.seal(fx.topic, fx.kind, fx.body, now=self.now, version=fx.version, round=fx.round)
        if fx.retain:
            self.retained[fx.topic] = payloads
        self.queue.append((fx.topic, payloads, False))

    def _subscribe(self, node: Node, fx: Subscribe) -> None:
        node.subs.append(fx.topic)
        for topic, payloads in list(self.retained.items()) if fx.retained else []:
            if topic_matches(fx.topic, topic):
                self.queue.append((topic, payloads, node.name))

    def _train(self, node: Node, fx: Train) -> None:
        if node.name in self.silent:
            return
        if self.train_time is None:
            self.finish_training(node.name, fx)
        else:
            heapq.heappush(self._training, (self.now + self.train_time[node.name], id(fx), node.name, fx))

    def pump(self, limit: int = 100000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            topic, payloads, only = self.queue.pop(0)
            for node in list(self.nodes.values()):
                if not node.alive or (only and node.name != only):
                    continue
                if not any(topic_matches(f, topic) for f in node.subs):
                    continue
                for payload in payloads:
                    self.deliver(node, topic, payload, retained=bool(only))
        raise AssertionError("bus did not settle")

    def deliver(self, node: Node, topic: str, payload: bytes, retained: bool = False) -> None:
        try:
            msg = node.inbox.receive(topic, payload, self.now, retained=retained)
        except ProtocolError as exc:
            self.rejections.append((node.name, exc.reason))
            if isinstance(node.core, MasterCore):
                self.run(node.name, node.core.on_rejected(exc.reason, None, self.now))
            return
        if msg is None:
            return
        if isinstance(node.core, MasterCore):
            self.run(node.name, node.core.on_message(msg, self.now, token=("ack", topic, payload[-8:])))
        else:
            self.run(node.name, node.core.on_message(msg, self.now))

    # ------------------------------------------------------------ faults

    def saved(self, name: str) -> dict[str, Any] | None:
        """The slave's state file: the last `SaveState` it asked for."""
        states = [fx.state for fx in self.effects[name] if isinstance(fx, SaveState)]
        return states[-1] if states else None

    def restart_slave(self, name: str, *, keep_state: bool = True) -> None:
        """The slave process dies and starts again (its state file kept or lost); the
        broker keeps its retained messages."""
        node = self.nodes[name]
        old = node.core
        node.core = SlaveCore(old.cfg, old.public_key, old.samples, data_misfit=old.data_misfit)
        node.sealer = Sealer(node.sealer.identity, node.sealer.job, seq=node.sealer.next_seq + 1000)
        node.inbox = Inbox(node.inbox.keyring, node.inbox.job)
        node.subs = []
        self.run(name, node.core.start(self.now, self.saved(name) if keep_state else None))
        self.pump()

    def presence(self, name: str, online: bool) -> None:
        """The slave's presence (or, offline, its will) reaches the broker."""
        node = self.nodes[name]
        topic = node.core.topics.slave("presence", name)
        payloads = node.sealer.seal(topic, M.PRESENCE, {"state": "online" if online else "offline", "version": -1},
                                    now=self.now)
        self.retained[topic] = payloads
        self.queue.append((topic, payloads, False))
        self.pump()

    def finish_training(self, name: str, fx: Train) -> None:
        node = self.nodes[name]
        if self.trainer is not None:
            result = self.trainer(node, fx)
        else:
            result = run_training(node.core.instruction, fx.params, node.dataset, seed=fx.round)
        self.run(name, node.core.on_trained(fx.round, fx.version, result, self.now))

    def advance(self, until: float, step: float = 1.0) -> None:
        """Simulated time passes: training finishes in order, the master's clock ticks."""
        while self.now < until and not self.finished:
            nxt = min(self.now + step, until, self._training[0][0] if self._training else until)
            self.now = nxt
            while self._training and self._training[0][0] <= self.now:
                _, _, name, fx = heapq.heappop(self._training)
                if self.nodes[name].alive:
                    self.finish_training(name, fx)
            self.tick(0.0)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for node in list(self.nodes.values()):
            if node.alive:
                self.run(node.name, node.core.tick(self.now))
        self.pump()


def job_config(tmp_path, **over: Any) -> JobConfig:
    policy = RoundPolicy(**over.pop("policy", {}))
    base = dict(
        job="digits", rounds=5, task="digits", update="delta", model={"arch": "mlp", "sizes": [64, 32, 10], "seed": 0},
        train=TrainSettings(epochs=1), strategy={"name": "fedavg"}, policy=policy, enrollment="allowlist",
        slave_keys=tmp_path, master_key=tmp_path / "master.key", state_dir=tmp_path, broker=BrokerConfig(),
    )
    base.update(over)
    return JobConfig(**base)


@pytest.fixture
def fleet(tmp_path):
    """Build a bus with a master and N slaves on reference-workload shards."""
    from fedmq.common.workload import data_misfit, reference_split

    def make(n_slaves: int = 4, *, enrolled: int | None = None, tasks: dict[int, list[str]] | None = None,
             evaluate: bool = True, silent: tuple[str, ...] = (), train_time: dict[int, float] | None = None,
             run_for: float = 0.0, data_for: dict[int, Any] | None = None, **job_over: Any) -> Bus:
        cfg = job_config(tmp_path, **job_over)
        split = reference_split(num_slaves=n_slaves)
        bus = Bus()
        bus.silent.update(silent)
        if train_time is not None:
            bus.train_time = {f"slave-{i}": train_time.get(i, 1.0) for i in range(n_slaves)}
        master_id = Identity.generate("master")
        slave_ids = [Identity.generate(f"slave-{i}") for i in range(n_slaves)]
        ring = KeyRing()
        for ident in slave_ids[: n_slaves if enrolled is None else enrolled]:
            ring.add(ident.name, ident.public_key)
        model = job_model(cfg)  # the whole model, or its parts (a [distill] job's teacher read from its file)
        layout = Layout.of_job(cfg)
        test = split.test_dataset()
        def evaluator(params):
            m = layout.build()
            m.load_state_dict(params, strict=False)
            return layout.evaluate(m, test)

        master = MasterCore(cfg, model, make_job_strategy(cfg),
                            evaluate=evaluator if evaluate else None)
        bus.add(Node("master", Sealer(master_id, cfg.job, seq=1),
                     Inbox(ring, cfg.job, self_signed=M.SELF_SIGNED_KINDS), master,
                     subs=[cfg.topics.slaves(k) for k in ("confirm", "update", "presence")]))
        master_ring = KeyRing()
        master_ring.add("master", master_id.public_key)
        for i, ident in enumerate(slave_ids):
            scfg = SlaveConfig(slave_id=ident.name, job=cfg.job, key=tmp_path / "k", master_key=tmp_path / "m",
                               data=f"reference:{i}/{n_slaves}", state_dir=tmp_path, broker=BrokerConfig(),
                               tasks=tuple((tasks or {}).get(i, ())))
            ds = (data_for or {}).get(i) or split.slave_dataset(i)
            core = SlaveCore(scfg, raw_public_bytes(ident.public_key), len(ds),
                             data_misfit=lambda model, task=None, ds=ds: data_misfit(model, ds, task))
            bus.add(Node(ident.name, Sealer(ident, cfg.job, seq=1), Inbox(master_ring, cfg.job), core, dataset=ds))
        bus.cfg, bus.master_ring, bus.evaluator = cfg, ring, evaluator if evaluate else None
        bus.run("master", master.start(bus.now))
        for node in list(bus.nodes.values()):
            if node.name != "master":
                bus.run(node.name, node.core.start(bus.now))
        bus.pump()
        if run_for:
            bus.advance(bus.now + run_for)
        return bus

    return make
