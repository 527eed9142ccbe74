"""Sharded aggregation in one process: a root, two workers and real slaves over the in-memory bus.

The bus delivers a shared subscription (`$share/GROUP/FILTER`) to one member of the
group per message, in turn, as Mosquitto does; a worker's journal is what its
`Journal` effects wrote since its last `Checkpoint`. The reference is a single
MasterCore that runs the same slaves on the same split: the sharded job must make
the same model, up to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedmq.common import messages as M
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.effects import Ack, Checkpoint, Journal, Log, Publish
from fedmq.common.envelope import loads
from fedmq.common.errors import ConfigError, ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.keys import Identity, KeyRing, raw_public_bytes
from fedmq.common.modelspec import build_model
from fedmq.common.shardconfig import ShardSettings
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.master.core import MasterCore
from fedmq.master.job import make_job_strategy
from fedmq.master.partial import PartialSum, combine, weighted_step
from fedmq.master.sharded import RootCore, ShardedRounds, check_shardable
from fedmq.master.worker import WorkerCore
from fedmq.slave.core import SlaveCore

from .conftest import Bus, Node, job_config, topic_matches

GROUP = "fedmq-digits"


class ShardBus(Bus):
    """The bus with shared subscriptions and worker journals (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared: dict[str, list[str]] = {}  # "$share/G/FILTER" -> member nodes, in turn
        self.parked: dict[str, list[tuple[str, bytes]]] = {}  # messages for a worker that is down

    def subscribe_shared(self, name: str, shared: str) -> None:
        self.shared.setdefault(shared, []).append(name)

    def pump(self, limit: int = 100000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            topic, payloads, only = self.queue.pop(0)
            for node in list(self.nodes.values()):
                if (only and node.name != only) or not any(topic_matches(f, topic) for f in node.subs):
                    continue
                if node.alive:
                    for payload in payloads:
                        self.deliver(node, topic, payload, retained=bool(only))
            if only:
                continue
            for shared, members in self.shared.items():
                if topic_matches(shared.split("/", 2)[2], topic):
                    for payload in payloads:  # one member per MQTT message, in turn
                        name = members.pop(0)
                        members.append(name)
                        node = self.nodes[name]
                        if node.alive:
                            self.deliver(node, topic, payload)
                        else:  # its persistent session keeps it
                            self.parked.setdefault(name, []).append((topic, payload))
        raise AssertionError("bus did not settle")

    def deliver(self, node: Node, topic: str, payload: bytes, retained: bool = False) -> None:
        if not isinstance(node.core, WorkerCore):
            super().deliver(node, topic, payload, retained)
            return
        try:
            msg = node.inbox.receive(topic, payload, self.now, retained=retained)
        except ProtocolError as exc:
            self.rejections.append((node.name, exc.reason))
            return
        if msg is not None:  # as the worker daemon: with a token to acknowledge
            self.run(node.name, node.core.on_message(msg, self.now, token=("ack", topic, payload[-8:])))
        self.run(node.name, node.core.flush(self.now))  # its queue is idle: the journal is synced, tally

    def journal(self, name: str) -> list[dict[str, Any]]:
        """The worker's journal: its Journal records since its last Checkpoint, bodies decoded."""
        out: list[dict[str, Any]] = []
        for fx in self.effects[name]:
            if isinstance(fx, Checkpoint):
                out = []
            elif isinstance(fx, Journal):
                out.append({**fx.record, "body": loads(fx.raw_body)})
        return out

    def state(self, name: str) -> dict[str, Any] | None:
        states = [fx.state for fx in self.effects[name] if isinstance(fx, Checkpoint)]
        return states[-1] if states else None

    def restart_worker(self, name: str) -> WorkerCore:
        """The worker process dies (kill -9) and starts again: state file, journal, then
        the broker's retained messages and what its session kept."""
        node = self.nodes[name]
        old: WorkerCore = node.core
        core = WorkerCore(old.cfg, old.worker, build_model(old.cfg.model), old.strategy, lambda: self.journal(name))
        state = self.state(name)
        if state:
            core.restore(state)
        for record in self.journal(name):
            core.replay(record)
        node.core, node.alive = core, True
        node.inbox = Inbox(node.inbox.keyring, node.inbox.job)
        self.run(name, core.start(self.now))
        for topic, payloads in list(self.retained.items()):
            if any(topic_matches(f, topic) for f in node.subs):
                self.queue.append((topic, payloads, name))
        self.pump()
        for topic, payload in self.parked.pop(name, []):
            self.deliver(node, topic, payload)
        self.pump()
        return core


def build(tmp_path: Path, n_slaves: int, *, sharded: bool, workers: int = 2, rounds: int = 4,
          train_time: dict[int, float] | None = None, **job_over: Any) -> ShardBus:
    """A fleet of `n_slaves` on the reference split; a single master or a root with workers."""
    from fedmq.common.workload import data_misfit, reference_split

    shard = ShardSettings(workers=tuple(f"w{i}" for i in range(workers)), keys=tmp_path, master_pub=tmp_path / "m",
                          group=GROUP, collect_timeout=20.0) if sharded else None
    cfg = job_config(tmp_path, rounds=rounds, shard=shard, **job_over)
    split = reference_split(num_slaves=n_slaves)
    bus = ShardBus()
    if train_time is not None:
        bus.train_time = {f"slave-{i}": train_time.get(i, 1.0) for i in range(n_slaves)}
    ids = {f"slave-{i}": Identity.generate(f"slave-{i}") for i in range(n_slaves)}
    master_id = Identity.generate("master")
    ring = KeyRing()
    for ident in ids.values():
        ring.add(ident.name, ident.public_key)
    master_ring = KeyRing()
    master_ring.add("master", master_id.public_key)
    strategy = make_job_strategy(cfg)
    if sharded:
        root_ring = KeyRing()
        for ident in ids.values():
            root_ring.add(ident.name, ident.public_key)
        worker_ids = {w: Identity.generate(w) for w in shard.workers}
        for ident in worker_ids.values():
            root_ring.add(ident.name, ident.public_key)
        core = RootCore(MasterCore(cfg, build_model(cfg.model), strategy,
                                   schedule=ShardedRounds(strategy, cfg.policy)), shard)
        bus.add(Node("master", Sealer(master_id, cfg.job, seq=1),
                     Inbox(root_ring, cfg.job, self_signed=M.SELF_SIGNED_KINDS), core,
                     subs=[cfg.topics.slaves("confirm"), cfg.topics.slaves("presence"), cfg.topics.partials]))
        worker_ring = KeyRing()
        for ident in [master_id, *ids.values()]:
            worker_ring.add(ident.name, ident.public_key)
        for w, ident in worker_ids.items():
            wcore = WorkerCore(cfg, w, build_model(cfg.model), make_job_strategy(cfg), lambda w=w: bus.journal(w))
            bus.add(Node(w, Sealer(ident, cfg.job, seq=1), Inbox(worker_ring, cfg.job), wcore,
                         subs=[cfg.topics.master("round"), cfg.topics.master("collect")]))
            bus.subscribe_shared(w, cfg.topics.shared_updates(GROUP))
    else:
        core = MasterCore(cfg, build_model(cfg.model), strategy)
        bus.add(Node("master", Sealer(master_id, cfg.job, seq=1),
                     Inbox(ring, cfg.job, self_signed=M.SELF_SIGNED_KINDS), core,
                     subs=[cfg.topics.slaves(k) for k in ("confirm", "update", "presence")]))
    for i, (name, ident) in enumerate(ids.items()):
        scfg = SlaveConfig(slave_id=name, job=cfg.job, key=tmp_path / "k", master_key=tmp_path / "m",
                           data=f"reference:{i}/{n_slaves}", state_dir=tmp_path, broker=BrokerConfig())
        ds = split.slave_dataset(i)
        slave = SlaveCore(scfg, raw_public_bytes(ident.public_key), len(ds),
                          data_misfit=lambda model, ds=ds: data_misfit(model, ds))
        bus.add(Node(name, Sealer(ident, cfg.job, seq=1), Inbox(master_ring, cfg.job), slave, dataset=ds))
    bus.cfg = cfg
    bus.run("master", core.start(bus.now))
    for node in list(bus.nodes.values()):
        if node.name != "master" and isinstance(node.core, SlaveCore):
            bus.run(node.name, node.core.start(bus.now))
    bus.pump()
    return bus


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


# ---------------------------------------------------------------- arithmetic


def test_partial_sums_add_up_to_the_strategy_aggregate():
    torch.manual_seed(0)
    params = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    updates = [ClientUpdate(f"s{i}", kind, {k: torch.randn_like(v) for k, v in params.items()}, 10 + 7 * i, 0)
               for i, kind in enumerate(["delta", "gradient", "delta", "delta", "gradient"])]
    for name in ("fedavg", "fedavgm", "fedadam"):
        table = {"name": name, "clip_norm": 2.0}
        expected = make_strategy(table, gradient_lr=0.1).aggregate(params, updates, 0)
        strategy = make_strategy(table, gradient_lr=0.1)
        shards = [PartialSum.zeros_like(params) for _ in range(2)]
        for i, u in enumerate(updates):
            shards[i % 2].add(f"u{i}", weighted_step(u, params, strategy), u.aggregation_weight)
        total = PartialSum.zeros_like(params)
        for part in shards:
            total.merge(part)
        assert close(combine(params, total, strategy), expected), name
    with pytest.raises(ValueError, match="overlap"):
        total.merge(shards[0])


def test_what_cannot_be_sharded_is_refused(tmp_path):
    cfg = job_config(tmp_path)
    check_shardable(cfg, make_job_strategy(cfg))
    for over, match in [({"strategy": {"name": "fedavg", "rule": "median"}}, "not a sum"),
                        ({"strategy": {"name": "fedavg", "rule": "trimmed_mean"}}, "not a sum"),
                        ({"strategy": {"name": "fedavg", "rule": "krum", "krum_f": 1}, "policy": {"min_updates": 5}},
                         "not a sum"),
                        ({"strategy": {"name": "fedbuff"}}, "asynchronous"),
                        ({"strategy": {"name": "fedasync"}}, "asynchronous"),
                        ({"update": "student"}, "student"),
                        ({"enrollment": "open"}, "open")]:
        bad = job_config(tmp_path, **over)
        with pytest.raises(ConfigError, match=match):
            check_shardable(bad, make_job_strategy(bad))


# ---------------------------------------------------------------- end to end


def test_two_workers_make_the_same_model_as_one_master(tmp_path):
    single = build(tmp_path / "single", 4, sharded=False, policy={"min_slaves": 4})
    sharded = build(tmp_path / "sharded", 4, sharded=True, policy={"min_slaves": 4})
    assert single.finished and sharded.finished
    root = sharded.nodes["master"].core
    assert root.version == single.nodes["master"].core.version == 4
    assert close(root.params, single.nodes["master"].core.params)
    # every version was made from partial sums of both workers, covering all four updates
    rows = root.history
    assert [r["updates"] for r in rows] == [4] * 4
    answered = {w: sharded.nodes[w].core.answered for w in ("w0", "w1")}
    assert answered == {"w0": 4, "w1": 4}, answered
    # the slaves were told to send whole updates (one MQTT message each)
    updates = [fx for n in ("slave-0", "slave-1") for fx in sharded.effects[n]
               if isinstance(fx, Publish) and fx.kind == M.UPDATE]
    assert updates and all(fx.whole for fx in updates)
    # a worker acknowledges an update right after journaling it, and tallies only journaled ones
    for w in ("w0", "w1"):
        fx, journaled = sharded.effects[w], set()
        for i, e in enumerate(fx):
            if isinstance(e, Journal):
                journaled.add(e.record["update_id"])
                assert isinstance(fx[i + 1], Ack)
            if isinstance(e, Publish) and e.kind == M.TALLY:
                assert {t["update_id"] for t in e.body["updates"]} <= journaled
    # the root never saw an update, only tallies and partial sums
    assert not any(isinstance(fx, Journal) and "worker" not in fx.record and "update_id" in fx.record
                   for fx in sharded.effects["master"])


@pytest.mark.parametrize("when", ["after acknowledging an update", "after its tally, before the collect"])
def test_a_worker_killed_mid_round_loses_nothing_it_acknowledged(tmp_path, when):
    ref = build(tmp_path / "ref", 4, sharded=False, policy={"min_slaves": 4})
    bus = build(tmp_path / "sharded", 4, sharded=True, train_time={i: 1.0 + i for i in range(4)},
                policy={"min_slaves": 4})
    root = bus.nodes["master"].core
    w1 = bus.nodes["w1"]
    # run until round 2 has begun and w1 holds an update of it
    while not (root.version == 1 and w1.core.held):
        bus.advance(bus.now + 0.25, step=0.25)
    held = set(w1.core.held)
    if when == "after acknowledging an update":
        journaled = {r["update_id"] for r in bus.journal("w1")}
        assert held <= journaled  # acknowledged only once journaled
    else:
        while root.round is None or not held <= set(root.round.updates):
            bus.advance(bus.now + 0.25, step=0.25)
    w1.alive = False  # kill -9
    bus.advance(bus.now + 10, step=0.25)
    assert root.version == 1, "the round waits for what the dead worker acknowledged"
    bus.restart_worker("w1")
    bus.advance(bus.now + 120, step=0.25)
    assert bus.finished and root.version == 4
    assert held <= set(root.history[1]["update_ids"]), "what w1 acknowledged made version 2"
    assert [r["updates"] for r in root.history] == [4] * 4
    assert close(root.params, ref.nodes["master"].core.params)


def test_a_worker_that_never_comes_back_costs_time_not_the_job(tmp_path):
    bus = build(tmp_path, 4, sharded=True, train_time={i: 1.0 + i for i in range(4)},
                policy={"min_slaves": 4, "deadline": 30.0})
    root, w1 = bus.nodes["master"].core, bus.nodes["w1"]
    while not (root.version == 1 and root.round is not None and any(u in root.round.updates for u in w1.core.held)):
        bus.advance(bus.now + 0.25, step=0.25)
    w1.alive = False
    bus.advance(bus.now + 2000, step=0.5)
    assert bus.finished and root.version == 4
    logs = [fx.message for fx in bus.effects["master"] if isinstance(fx, Log)]
    assert any("no partial sum from w1" in m for m in logs), logs[-20:]


def test_the_root_restarted_mid_round_counts_its_journaled_tallies_again(tmp_path):
    bus = build(tmp_path, 4, sharded=True, train_time={i: 1.0 + i for i in range(4)}, policy={"min_slaves": 4})
    root = bus.nodes["master"].core
    while not (root.version == 1 and root.round is not None and len(root.round.updates) >= 2):
        bus.advance(bus.now + 0.25, step=0.25)
    tallied = set(root.round.updates)
    # the root process dies: a new one from its checkpoint and journal
    state = [fx.state for fx in bus.effects["master"] if isinstance(fx, Checkpoint)][-1]
    records, fx_list = [], bus.effects["master"]
    last = max(i for i, fx in enumerate(fx_list) if isinstance(fx, Checkpoint))
    records = [{**fx.record, "body": loads(fx.raw_body)} for fx in fx_list[last:] if isinstance(fx, Journal)]
    cfg = bus.cfg
    strategy = make_job_strategy(cfg)
    new = RootCore(MasterCore(cfg, build_model(cfg.model), strategy, schedule=ShardedRounds(strategy, cfg.policy),
                              run=root.master.run), cfg.shard)
    new.restore(state)
    for record in records:
        new.replay(record)
    bus.nodes["master"].core = new
    sent_before = sum(isinstance(fx, Publish) and fx.kind == M.UPDATE for n in bus.nodes for fx in bus.effects[n])
    start = new.start(bus.now)
    announces = [fx for fx in start if isinstance(fx, Publish) and fx.kind == M.ROUND]
    assert len(announces) == 1 and tallied <= {f"{s}/2/1" for s in announces[0].body["received"]}
    bus.run("master", start)
    bus.pump()
    sent_after = sum(isinstance(fx, Publish) and fx.kind == M.UPDATE for n in bus.nodes for fx in bus.effects[n])
    assert sent_after == sent_before, "no slave sends again what a worker holds and the root journaled"
    bus.advance(bus.now + 200, step=0.25)
    assert bus.finished and new.version == 4 and [r["updates"] for r in new.history[-3:]] == [4, 4, 4]
    assert tallied <= set(new.history[-3]["update_ids"])
