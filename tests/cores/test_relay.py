"""The relay core over the in-memory bus: an upstream master, two direct slaves, and a relay with three devices.

The relay node speaks two jobs: its site job "site" (it is the master, its devices the
slaves) and the upstream job "digits" (it is one slave); the bus routes each message by
its topic, and carries out `Upstream` effects with the relay's upstream key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from fedmq.common import messages as M
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.effects import Checkpoint, Interpreter, Journal, Log, Publish, SaveState, Subscribe
from fedmq.common.envelope import loads
from fedmq.common.errors import ProtocolError
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.keys import Identity, KeyRing, raw_public_bytes
from fedmq.common.modelspec import build_model
from fedmq.master.core import MasterCore
from fedmq.master.job import make_job_strategy
from fedmq.relay.config import LOCAL_ROUNDS_UNBOUNDED
from fedmq.relay.core import RelayCore, Upstream
from fedmq.slave.core import SlaveCore

from .conftest import Bus, Node, job_config

SITE = "site"


class RelayBus(Bus):
    """The bus, with a relay node that has an upstream key and inbox besides its site ones."""

    def _interpreter(self, name: str) -> Interpreter:
        node = self.nodes[name]
        if not isinstance(node.core, RelayCore):
            return super()._interpreter(name)
        down = super()._interpreter(name)
        up_view = Node(name, node.up_sealer, node.up_inbox, node.core)
        up = Interpreter({Publish: lambda fx: self._publish(up_view, fx),
                          Subscribe: lambda fx: self._subscribe(node, fx)}, ignore={Log, SaveState})
        down.handlers[Upstream] = lambda fx: up([fx.effect])
        return down

    def deliver(self, node: Node, topic: str, payload: bytes, retained: bool = False) -> None:
        if isinstance(node.core, RelayCore) and node.core.up.topics.parse(topic) is not None:
            try:
                msg = node.up_inbox.receive(topic, payload, self.now, retained=retained)
            except ProtocolError as exc:
                self.rejections.append((node.name, exc.reason))
                return
            if msg is not None:
                self.run(node.name, node.core.on_up_message(msg, self.now))
            return
        super().deliver(node, topic, payload, retained)

    def upstream_saved(self, name: str) -> dict[str, Any] | None:
        states = [fx.effect.state for fx in self.effects[name]
                  if isinstance(fx, Upstream) and isinstance(fx.effect, SaveState)]
        return states[-1] if states else None


def build(tmp_path: Path, *, direct: int = 2, devices: int = 3, rounds: int = 5, exchange_rounds: int = 1,
          exchange_samples: int = 0, train_time: dict[str, float] | None = None, up_policy: dict | None = None,
          start: bool = True) -> RelayBus:
    from fedmq.common.workload import data_misfit, reference_split

    split = reference_split(num_slaves=direct + devices)
    bus = RelayBus()
    if train_time is not None:
        bus.train_time = train_time
    up_cfg = job_config(tmp_path, rounds=rounds, policy=up_policy or {"min_slaves": direct + 1})
    site_cfg = job_config(tmp_path, job=SITE, rounds=LOCAL_ROUNDS_UNBOUNDED, policy={"min_slaves": devices})
    master_id, relay_up_id, relay_down_id = Identity.generate("master"), Identity.generate("relay-a"), \
        Identity.generate("master")
    direct_ids = [Identity.generate(f"slave-{i}") for i in range(direct)]
    device_ids = [Identity.generate(f"dev-{i}") for i in range(devices)]
    up_ring = KeyRing()
    for ident in [*direct_ids, relay_up_id]:
        up_ring.add(ident.name, ident.public_key)
    master = MasterCore(up_cfg, build_model(up_cfg.model), make_job_strategy(up_cfg))
    bus.add(Node("master", Sealer(master_id, up_cfg.job, seq=1), Inbox(up_ring, up_cfg.job, self_signed=M.SELF_SIGNED_KINDS),
                 master, subs=[up_cfg.topics.slaves(k) for k in ("confirm", "update", "presence")]))
    # the relay: master of SITE, slave "relay-a" of digits
    site_ring = KeyRing()
    for ident in device_ids:
        site_ring.add(ident.name, ident.public_key)
    up_slave_cfg = SlaveConfig(slave_id="relay-a", job=up_cfg.job, key=tmp_path / "k", master_key=tmp_path / "m",
                               data="relay:", state_dir=tmp_path, broker=BrokerConfig(), tasks=(site_cfg.task,),
                               update_kinds=("delta",))
    up_core = SlaveCore(up_slave_cfg, raw_public_bytes(relay_up_id.public_key), 0)
    relay = RelayCore(MasterCore(site_cfg, build_model(site_cfg.model), make_job_strategy(site_cfg)), up_core,
                      exchange_rounds=exchange_rounds, exchange_samples=exchange_samples)
    master_ring = KeyRing()
    master_ring.add("master", master_id.public_key)
    node = Node("relay-a", Sealer(relay_down_id, SITE, seq=1), Inbox(site_ring, SITE, self_signed=M.SELF_SIGNED_KINDS),
                relay, subs=[site_cfg.topics.slaves(k) for k in ("confirm", "update", "presence")])
    node.up_sealer, node.up_inbox = Sealer(relay_up_id, up_cfg.job, seq=1), Inbox(master_ring, up_cfg.job)
    bus.add(node)
    site_master_ring = KeyRing()
    site_master_ring.add("master", relay_down_id.public_key)
    for i, ident in enumerate([*direct_ids, *device_ids]):
        on_site = i >= direct
        cfg = site_cfg if on_site else up_cfg
        scfg = SlaveConfig(slave_id=ident.name, job=cfg.job, key=tmp_path / "k", master_key=tmp_path / "m",
                           data=f"reference:{i}/{direct + devices}", state_dir=tmp_path, broker=BrokerConfig())
        ds = split.slave_dataset(i)
        core = SlaveCore(scfg, raw_public_bytes(ident.public_key), len(ds),
                         data_misfit=lambda model, ds=ds: data_misfit(model, ds))
        bus.add(Node(ident.name, Sealer(ident, cfg.job, seq=1),
                     Inbox(site_master_ring if on_site else master_ring, cfg.job), core, dataset=ds))
    bus.up_cfg, bus.site_cfg, bus.split = up_cfg, site_cfg, split
    if start:
        bus.run("master", master.start(bus.now))
        bus.run("relay-a", relay.start(bus.now))
        bus.run("relay-a", relay.up_start(bus.now, None))
        for node in list(bus.nodes.values()):
            if isinstance(node.core, SlaveCore):
                bus.run(node.name, node.core.start(bus.now))
        bus.pump()
    return bus


def device_samples(bus: RelayBus) -> int:
    return sum(len(bus.nodes[n].dataset) for n in bus.nodes if n.startswith("dev-"))


def test_the_upstream_master_sees_one_party_carrying_its_devices_samples(tmp_path):
    bus = build(tmp_path)
    bus.advance(bus.now + 300)
    assert bus.finished
    master, relay = bus.nodes["master"].core, bus.nodes["relay-a"].core
    assert master.version == 5
    # enrolled upstream as one slave, declaring the samples of all its devices
    rec = master.slaves["relay-a"]
    assert rec.enrolled and rec.samples == device_samples(bus)
    assert not any(n.startswith("dev-") for n in master.slaves), "the devices are not the upstream master's"
    # every upstream version used the relay's update, which carried its devices' samples
    for row in master.history:
        assert "relay-a/%d/%d" % (row["round"], row["version"] - 1) in row["update_ids"]
    sent = [fx.effect for fx in bus.effects["relay-a"] if isinstance(fx, Upstream)
            and isinstance(fx.effect, Publish) and fx.effect.kind == M.UPDATE]
    assert len(sent) == 5 and all(p.body["samples"] == device_samples(bus) for p in sent)
    assert all(p.body["kind"] == "delta" and p.body["metrics"]["local_rounds"] == 1 for p in sent)
    # the site: the upstream model became a local version, then one local round made the next
    site = relay.master
    assert site.version == 10 and [r["version"] for r in site.history] == [2, 4, 6, 8, 10]
    assert all(r["updates"] == 3 for r in site.history)
    # the accuracy of the global model grows (five slaves' data, three of them behind the relay)
    accs = [r["accuracy"] for r in master.history if "accuracy" in r] or [None]
    assert relay.status()["upstream"]["enrolled"] and relay.status()["task"]["sent"]
    assert bus.json["fedmq/site/status"]["relay"]["upstream"]["job"] == "digits"
    assert bus.json["fedmq/site/metrics"]["upstream"] == {"round": 5, "version": 4}
    del accs


def test_exchange_every_m_local_rounds_or_n_samples(tmp_path):
    bus = build(tmp_path / "m", rounds=2, exchange_rounds=3)
    bus.advance(bus.now + 300)
    relay = bus.nodes["relay-a"].core
    assert bus.finished and relay.master.version == 8  # per upstream round: adopt + 3 local rounds
    sent = [fx.effect for fx in bus.effects["relay-a"] if isinstance(fx, Upstream)
            and isinstance(fx.effect, Publish) and fx.effect.kind == M.UPDATE]
    assert [p.body["metrics"]["local_rounds"] for p in sent] == [3, 3]
    # by samples: the local rounds' updates reach N before M rounds are done
    bus = build(tmp_path / "n", rounds=2, exchange_rounds=10, exchange_samples=1)
    bus.advance(bus.now + 300)
    sent = [fx.effect for fx in bus.effects["relay-a"] if isinstance(fx, Upstream)
            and isinstance(fx.effect, Publish) and fx.effect.kind == M.UPDATE]
    assert bus.finished and [p.body["metrics"]["local_rounds"] for p in sent] == [1, 1]


def test_durable_before_acted_on_on_both_sides(tmp_path):
    bus = build(tmp_path, rounds=2)
    bus.advance(bus.now + 300)
    fx = bus.effects["relay-a"]
    for i, e in enumerate(fx):
        if isinstance(e, Upstream) and isinstance(e.effect, Publish) and e.effect.kind == M.UPDATE:
            assert isinstance(fx[i - 1], Upstream) and isinstance(fx[i - 1].effect, SaveState), \
                "the upstream update is persisted before it is sent"
            local = max(j for j in range(i) if isinstance(fx[j], Checkpoint))
            assert fx[local].state["relay"]["round"] == e.effect.round, "the task is in the site's checkpoint"
    # the site's local updates are journaled before they are acknowledged (the master core's own rule),
    # and the checkpoint that holds the upstream model as a local version carries the task
    adopted = [e for e in fx if isinstance(e, Checkpoint) and e.state["relay"] and
               e.state["version"] == e.state["relay"]["base_local"]]
    assert len(adopted) == 2


def test_the_relay_killed_mid_local_round_loses_no_acknowledged_local_update(tmp_path):
    bus = build(tmp_path, rounds=3, train_time={"dev-0": 1.0, "dev-1": 1.0, "dev-2": 8.0, "slave-0": 1.0,
                                                "slave-1": 1.0})
    relay = bus.nodes["relay-a"].core
    while not (bus.nodes["master"].core.version == 1 and relay.master.round is not None
               and len(relay.master.round.updates) == 2):
        bus.advance(bus.now + 0.5, step=0.5)
    acknowledged = set(relay.master.round.updates)  # journaled and acked: dev-0 and dev-1
    # kill -9: a new relay process from the site's checkpoint and journal, and the upstream state file
    fx = bus.effects["relay-a"]
    last = max(i for i, e in enumerate(fx) if isinstance(e, Checkpoint))
    journal = [{**e.record, "body": loads(e.raw_body)} for e in fx[last:] if isinstance(e, Journal)]
    assert acknowledged <= {r.get("update_id") for r in journal}
    old = relay
    up = SlaveCore(old.up.cfg, old.up.public_key, 0)
    new = RelayCore(MasterCore(bus.site_cfg, build_model(bus.site_cfg.model), make_job_strategy(bus.site_cfg),
                               run=old.master.run), up, exchange_rounds=1)
    new.restore(fx[last].state)
    for record in journal:
        new.replay(record)
    node = bus.nodes["relay-a"]
    node.core, node.subs = new, [bus.site_cfg.topics.slaves(k) for k in ("confirm", "update", "presence")]
    node.inbox = Inbox(node.inbox.keyring, SITE, self_signed=M.SELF_SIGNED_KINDS)
    node.up_inbox = Inbox(node.up_inbox.keyring, bus.up_cfg.job)
    bus.run("relay-a", new.start(bus.now))
    bus.run("relay-a", new.up_start(bus.now, bus.upstream_saved("relay-a")))
    bus.pump()
    bus.advance(bus.now + 300, step=0.5)
    assert bus.finished and bus.nodes["master"].core.version == 3
    row = next(r for r in new.master.history if acknowledged & set(r["update_ids"]))
    assert acknowledged <= set(row["update_ids"]) and row["updates"] == 3
    sent = [e.effect for e in bus.effects["relay-a"] if isinstance(e, Upstream)
            and isinstance(e.effect, Publish) and e.effect.kind == M.UPDATE]
    assert sorted(p.body["update_id"] for p in sent) == ["relay-a/1/0", "relay-a/2/1", "relay-a/3/2"], \
        "one exchange per upstream round, none twice"


def test_a_relay_without_devices_declines_then_confirms_when_they_enroll(tmp_path):
    bus = build(tmp_path, rounds=1, start=False)
    master, relay = bus.nodes["master"].core, bus.nodes["relay-a"].core
    bus.run("master", master.start(bus.now))
    bus.run("relay-a", relay.start(bus.now))
    bus.run("relay-a", relay.up_start(bus.now, None))
    bus.pump()
    assert "0 local samples" in (master.slaves["relay-a"].declined or "")
    for node in list(bus.nodes.values()):
        if isinstance(node.core, SlaveCore):
            bus.run(node.name, node.core.start(bus.now))
    bus.pump()
    bus.advance(bus.now + 100)
    assert master.slaves["relay-a"].enrolled and bus.finished


def test_the_upstream_model_must_be_the_sites(tmp_path):
    bus = build(tmp_path, rounds=1, start=False)
    relay = bus.nodes["relay-a"].core
    assert relay.misfit(build_model(bus.site_cfg.model)) is None
    assert "not the site job's" in relay.misfit(build_model({"arch": "mlp", "sizes": [64, 16, 10], "seed": 0}))
