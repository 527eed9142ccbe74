"""Restarts, lost state and new runs, over the in-memory bus: every claim can be re-established.

Each test reproduces one way a job used to stall for good (docs/PROTOCOL.md section 11.5).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.effects import Checkpoint, Journal, Publish
from fedmq.common.keys import Identity
from fedmq.common.modelspec import build_model
from fedmq.master.core import MasterCore
from fedmq.master.job import make_job_strategy


def _restart_master(bus, *, keep_checkpoint: bool = True, keep_journal: bool = True, run: str = "0") -> MasterCore:
    """The master process dies and starts again, as MasterDaemon does it: checkpoint, journal, start."""
    old = bus.nodes["master"].core
    effects = bus.effects["master"]
    ckpts = [i for i, fx in enumerate(effects) if isinstance(fx, Checkpoint)]
    new = MasterCore(bus.cfg, build_model(bus.cfg.model), make_job_strategy(bus.cfg), evaluate=bus.evaluator, run=run)
    since = 0
    if keep_checkpoint and ckpts:
        new.restore(effects[ckpts[-1]].state)
        since = ckpts[-1]
    if keep_journal:
        for fx in effects[since:]:
            if isinstance(fx, Journal):
                new.replay(fx.record)
    node = bus.nodes["master"]
    node.core = new
    node.inbox = Inbox(bus.master_ring, bus.cfg.job, self_signed=M.SELF_SIGNED_KINDS)
    node.sealer = Sealer(node.sealer.identity, bus.cfg.job, seq=node.sealer.next_seq + 1000)
    bus.effects["master"] = []
    bus.run("master", new.start(bus.now))
    bus.pump()
    del old
    return new


def test_a_slave_killed_after_enrolling_before_version_1_trains_again(fleet):
    # slave-1 is hung in its first training when it is killed: round 1 waits for it
    bus = fleet(2, rounds=2, evaluate=False, silent=("slave-1",), policy={"min_slaves": 2, "deadline": 60.0})
    master = bus.nodes["master"].core
    assert master.version == 0 and master.round.answered == {"slave-0"}
    bus.silent.clear()
    bus.restart_slave("slave-1")
    assert master.history[0]["updates"] == 2, "the restarted slave found model 0 retained and trained for round 1"
    assert bus.finished and master.version == 2


def test_every_slave_killed_before_version_1_with_its_state_deleted_rejoins(fleet):
    bus = fleet(3, rounds=1, evaluate=False, silent=("slave-0", "slave-1", "slave-2"),
                policy={"min_slaves": 3, "deadline": 30.0})
    master = bus.nodes["master"].core
    bus.silent.clear()
    for name in ("slave-0", "slave-1", "slave-2"):
        bus.restart_slave(name, keep_state=False)
    assert bus.finished and master.version == 1


def test_a_master_killed_before_its_first_version_keeps_who_is_enrolled(fleet):
    bus = fleet(2, rounds=2, evaluate=False, silent=("slave-0", "slave-1"), policy={"min_slaves": 2})
    assert [fx for fx in bus.effects["master"] if isinstance(fx, Journal) and fx.record.get("type") == "enroll"]
    new = _restart_master(bus)
    assert sorted(n for n, s in new.slaves.items() if s.enrolled) == ["slave-0", "slave-1"]
    assert new.round is not None and new.round.participants == ["slave-0", "slave-1"]


def test_a_master_that_lost_its_state_starts_a_new_run_and_every_slave_confirms_again(fleet):
    bus = fleet(2, rounds=3, evaluate=False, policy={"min_slaves": 2})
    assert bus.finished
    bus.finished = False
    new = _restart_master(bus, keep_checkpoint=False, keep_journal=False, run="second")
    assert sorted(n for n, s in new.slaves.items() if s.enrolled) == ["slave-0", "slave-1"]
    assert [row["updates"] for row in new.history] == [2, 2, 2], "the new run trained from version 0 with both"
    for name in ("slave-0", "slave-1"):
        core = bus.nodes[name].core
        assert core.run == "second" and core.enrolled and core.version == new.version == 3
    assert bus.finished


def test_a_model_of_an_earlier_run_or_an_older_version_is_refused(fleet):
    bus = fleet(2, rounds=3, evaluate=False, policy={"min_slaves": 2})
    slave = bus.nodes["slave-0"].core
    master = bus.nodes["master"]
    old_run = Publish(bus.cfg.topics.master("model"), M.MODEL, {**master.core.publisher.model_body("earlier")},
                      version=9, retain=True)
    bus.run("master", [old_run])
    bus.pump()
    assert slave.version == 3, "a signed model of another run is not adopted"
    bus.restart_slave("slave-0")  # state kept: it held version 3
    older = Publish(bus.cfg.topics.master("model"), M.MODEL, master.core.publisher.model_body(master.core.run),
                    version=2, retain=True)
    bus.run("master", [older])
    bus.pump()
    assert bus.nodes["slave-0"].core.version == -1 and bus.nodes["slave-0"].core.floor == 3


def test_a_slave_the_master_does_not_know_is_asked_to_confirm_again(fleet):
    bus = fleet(2, rounds=2, evaluate=False, silent=("slave-0", "slave-1"), policy={"min_slaves": 2})
    new = _restart_master(bus, keep_journal=False)  # the enrollments were only in the journal: lost
    assert not any(s.enrolled for s in new.slaves.values())
    bus.presence("slave-0", True)  # the slave is online, believes it is enrolled
    assert not [fx for fx in bus.effects["master"] if isinstance(fx, Publish) and fx.kind == M.RECONFIRM], \
        "not at once: a new slave's confirm follows its presence"
    bus.tick(6.0)
    asked = [fx for fx in bus.effects["master"] if isinstance(fx, Publish) and fx.kind == M.RECONFIRM]
    assert [fx.topic for fx in asked] == ["fedmq/digits/to/slave-0"]
    assert new.slaves["slave-0"].enrolled, "the slave confirmed again and was enrolled"


def test_a_key_added_to_the_allowlist_enrolls_a_slave_that_confirmed_while_unknown(fleet):
    bus = fleet(3, enrolled=2, rounds=1, evaluate=False, policy={"min_slaves": 3, "start_wait": 1000.0})
    master = bus.nodes["master"].core
    assert "slave-2" in master.not_enrolled and master.round is None
    ident: Identity = bus.nodes["slave-2"].sealer.identity
    bus.master_ring.add("slave-2", ident.public_key)
    bus.run("master", master.on_keys_added(["slave-2"], bus.now))
    bus.pump()
    assert master.slaves["slave-2"].enrolled and bus.finished


def test_a_slave_that_hears_nothing_after_confirming_confirms_again(fleet):
    bus = fleet(1, rounds=1, evaluate=False, policy={"min_slaves": 1})
    slave = bus.nodes["slave-0"].core
    slave.enrolled, slave._confirmed_at = False, bus.now  # as if the confirm had been lost
    assert slave.tick(bus.now + 29.0) == []
    (log, again) = slave.tick(bus.now + 31.0)
    assert again.kind == M.CONFIRM and slave.tick(bus.now + 60.0) == [], "then after 60 s, not 30"


def test_offline_presence_waits_out_its_grace_and_a_broker_stopping_voids_it(fleet):
    bus = fleet(3, rounds=5, evaluate=False, silent=("slave-2",),
                policy={"min_slaves": 3, "deadline": 100.0, "offline_grace": 5.0})
    master = bus.nodes["master"].core
    for name in ("slave-0", "slave-1", "slave-2"):
        bus.presence(name, False)  # a clean broker stop: every will at once
    assert all(s.online for s in master.slaves.values()) and master.version == 0
    bus.run("master", master.on_connection(False, bus.now))  # ...and then the master's own connection drops
    bus.tick(10.0)
    assert all(s.online for s in master.slaves.values()) and master.round.participants == ["slave-0", "slave-1", "slave-2"]
    bus.presence("slave-2", False)  # a real death: nothing else happens
    bus.tick(4.0)
    assert master.slaves["slave-2"].online and master.version == 0, "still within its grace"
    bus.tick(2.0)
    assert not master.slaves["slave-2"].online and master.history[0]["updates"] == 2, \
        "the round closed without the dead slave"


def test_a_slave_whose_data_does_not_fit_declines_with_the_reason(fleet):
    wrong = TensorDataset(torch.zeros(20, 30), torch.zeros(20, dtype=torch.long))
    bus = fleet(2, rounds=1, evaluate=False, data_for={1: wrong}, policy={"min_slaves": 1})
    master = bus.nodes["master"].core
    declined = master.slaves["slave-1"].declined
    assert declined.startswith("samples with features of shape [30] do not fit the model"), declined
    assert bus.json["fedmq/digits/status"]["slaves"]["slave-1"]["declined"] == declined
    assert bus.finished


def test_a_training_failure_withdraws_the_slave_so_no_round_waits_for_it(fleet):
    bus = fleet(2, rounds=2, evaluate=False, silent=("slave-1",), policy={"min_slaves": 2, "deadline": 60.0})
    master = bus.nodes["master"].core
    bus.run("slave-1", bus.nodes["slave-1"].core.on_training_failed(1, "RuntimeError: out of memory"))
    bus.pump()
    assert master.slaves["slave-1"].declined == "local training failed: RuntimeError: out of memory"
    assert master.version >= 1, "the round closed with the slave that could train"


def test_a_round_that_arrives_during_training_is_trained_next(fleet):
    bus = fleet(2, rounds=3, evaluate=False, train_time={0: 1.0, 1: 1.0}, policy={"min_slaves": 2})
    slave = bus.nodes["slave-0"].core
    bus.advance(bus.now + 1.5)
    assert slave.version == 1 and slave.training, "training for round 2 on version 1"
    bus.advance(bus.now + 10.0)
    assert bus.finished and bus.nodes["master"].core.version == 3


def test_a_new_slave_gets_its_model_once(fleet):
    """Presence then confirm, as a new slave sends them: one enrollment, one model on its
    topic, and the retained copy is not fetched again."""
    bus = fleet(1, rounds=1, evaluate=False, silent=("slave-0",), policy={"min_slaves": 1})
    bus.restart_slave("slave-0", keep_state=False)
    bus.presence("slave-0", True)
    bus.tick(6.0)
    direct = [fx for fx in bus.effects["master"] if isinstance(fx, Publish) and fx.topic.endswith("/to/slave-0")]
    assert [fx.kind for fx in direct] == [M.MODEL, M.MODEL], "once at the first start, once after the restart"
    models = [fx for fx in bus.effects["slave-0"] if type(fx).__name__ == "Log" and fx.message.startswith("model version")]
    assert len(models) == 2


def test_a_slave_asked_to_confirm_without_an_instruction_fetches_the_retained_one_again(fleet):
    """Junk was retained when it subscribed; the master's re-confirm request makes it look again."""
    from fedmq.common.effects import Subscribe

    bus = fleet(1, rounds=1, evaluate=False, silent=("slave-0",), policy={"min_slaves": 1})
    slave = bus.nodes["slave-0"].core
    slave.instruction, slave.instruction_digest, slave.enrolled = None, b"", False
    master = bus.nodes["master"]
    topic = bus.cfg.topics.direct("slave-0")
    bus.queue.append((topic, master.sealer.seal(topic, M.RECONFIRM, {"run": master.core.run, "reason": "not enrolled"},
                                                now=bus.now), False))
    bus.pump()
    assert slave.instruction is not None and slave.enrolled, "it fetched the instruction, confirmed, and enrolled"
    assert any(isinstance(fx, Subscribe) and fx.topic.endswith("/instruction") for fx in bus.effects["slave-0"][-20:])
