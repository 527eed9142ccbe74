"""Master and slave cores together over the in-memory bus: enrollment, rounds, durability."""

from __future__ import annotations

from fedmq.common.effects import Ack, Checkpoint, Journal, Log, Publish


def test_rounds_run_to_completion_and_learn(fleet):
    bus = fleet(4, rounds=6, policy={"min_slaves": 4})
    assert bus.finished
    master = bus.nodes["master"].core
    accs = [row["accuracy"] for row in master.history]
    assert len(accs) == 6 and master.version == 6
    assert accs[-1] > 0.6 and accs[-1] > accs[0]
    status = bus.json["fedmq/digits/status"]
    assert status["state"] == "finished" and status["version"] == 6


def test_journal_precedes_ack_and_checkpoint_precedes_publish(fleet):
    bus = fleet(2, rounds=2, policy={"min_slaves": 2})
    fx = bus.effects["master"]
    journals = [i for i, e in enumerate(fx) if isinstance(e, Journal) and "update_id" in e.record]
    assert len(journals) == 4  # two slaves, two rounds
    for i in journals:  # an accepted update is acked right after it is journaled
        assert isinstance(fx[i + 1], Ack) and fx[i + 1].token[1] == f"fedmq/digits/update/{fx[i].record['sender']}"
    for i, e in enumerate(fx):  # and an update is never acked otherwise, unless dropped with a reason
        if isinstance(e, Ack) and "/update/" in e.token[1]:
            assert isinstance(fx[i - 1], (Journal, Log))
    # an enrollment is journaled before the slave gets its model, and before its confirm is acked
    enrollments = {e.record["sender"]: i for i, e in enumerate(fx) if isinstance(e, Journal) and e.record.get("type") == "enroll"}
    assert sorted(enrollments) == ["slave-0", "slave-1"]
    for name, i in enrollments.items():
        sent = next(j for j, e in enumerate(fx) if isinstance(e, Publish) and e.topic.endswith(f"/to/{name}"))
        acked = next(j for j, e in enumerate(fx) if isinstance(e, Ack) and e.token[1].endswith(f"/confirm/{name}"))
        assert i < sent < acked
    model_pubs = [i for i, e in enumerate(fx) if isinstance(e, Publish) and e.topic.endswith("/model")]
    ckpts = [i for i, e in enumerate(fx) if isinstance(e, Checkpoint)]
    assert len(ckpts) == 3, "the run at start, then one per version"
    assert ckpts[0] == 0, "the run is durable before anything goes out"
    for c in ckpts[1:]:
        assert any(p == c + 1 for p in model_pubs), "the new version is published right after its checkpoint"


def test_unenrolled_key_is_ignored_and_reported(fleet):
    bus = fleet(3, enrolled=2, rounds=2, policy={"min_slaves": 2})
    master = bus.nodes["master"].core
    assert bus.finished
    assert "slave-2" in master.not_enrolled
    status = bus.json["fedmq/digits/status"]
    assert "slave-2" in status["not_enrolled"] and "slave-2" not in status["slaves"]
    assert {uid.split("/")[0] for uid in master.applied} == {"slave-0", "slave-1"}, "only enrolled slaves' updates count"


def test_declining_slave_gets_no_parameters(fleet):
    bus = fleet(3, tasks={2: ["speech"]}, rounds=2, policy={"min_slaves": 2})
    master = bus.nodes["master"].core
    assert master.slaves["slave-2"].declined == "no training samples for task 'digits' (serves speech)"
    decliner = bus.nodes["slave-2"].core
    assert decliner.version == -1 and not decliner.enrolled
    assert not any(isinstance(e, Publish) and e.topic.endswith("/to/slave-2") for e in bus.effects["master"])


def test_silent_slave_round_completes_at_deadline(fleet):
    bus = fleet(3, rounds=2, silent=("slave-2",), policy={"min_slaves": 3, "deadline": 30.0, "quorum": 3})
    master = bus.nodes["master"].core
    assert master.version == 0 and master.round is not None and len(master.round.updates) == 2
    bus.tick(29.0)
    assert master.version == 0, "no aggregation before the deadline"
    bus.tick(2.0)
    assert master.version == 1 and master.history[0]["updates"] == 2
    bus.tick(31.0)
    assert bus.finished and master.version == 2


def test_gradient_updates_converge(fleet):
    from fedmq.common.jobconfig import TrainSettings

    bus = fleet(4, rounds=25, update="gradient", train=TrainSettings(lr=1.0), policy={"min_slaves": 4})
    accs = [row["accuracy"] for row in bus.nodes["master"].core.history]
    assert len(accs) == 25 and accs[-1] > 0.7


def test_self_signed_decline_cannot_unenroll_a_slave(fleet):
    from fedmq.common import messages as M
    from fedmq.common.channel import Sealer
    from fedmq.common.keys import Identity, raw_public_bytes

    bus = fleet(2, rounds=1, evaluate=False, policy={"min_slaves": 2})
    master = bus.nodes["master"].core
    impostor = Identity.generate("slave-0")  # right name, key not in the allowlist
    topic = "fedmq/digits/confirm/slave-0"
    (payload,) = Sealer(impostor, "digits", seq=1).seal(  # a new key: any seq is fresh
        topic, M.DECLINE, {"public_key": raw_public_bytes(impostor.public_key), "reason": "spoof"}, now=bus.now)
    bus.deliver(bus.nodes["master"], topic, payload)
    assert master.slaves["slave-0"].enrolled and master.slaves["slave-0"].declined is None
    assert master.rejected.get("not_enrolled", 0) >= 1


def test_master_restart_mid_round_keeps_journaled_updates(fleet):
    from fedmq.common.effects import Journal
    from fedmq.master.core import MasterCore

    bus = fleet(3, rounds=2, evaluate=False, silent=("slave-2",), policy={"min_slaves": 3, "deadline": 30.0})
    old = bus.nodes["master"].core
    assert old.version == 0 and len(old.round.updates) == 2
    journal = [fx.record for fx in bus.effects["master"] if isinstance(fx, Journal)]
    checkpoint = old.checkpoint_state()
    # the master dies; a new process restores the checkpoint and replays its journal
    new = MasterCore(old.cfg, old.model, old.strategy)
    new.restore(checkpoint)
    for record in journal:
        new.replay(record)
    bus.nodes["master"].core = new
    bus.run("master", new.start(bus.now))
    bus.pump()
    assert new.round is not None and len(new.round.updates) == 2
    announced = [fx for fx in bus.effects["master"] if isinstance(fx, Publish) and fx.topic.endswith("/round")][-1]
    assert announced.body["received"] == ["slave-0", "slave-1"]
    assert new.duplicates == 0, "the re-announced round lists both journaled updates as received: nobody re-sends"
    bus.tick(31.0)
    assert new.version == 1 and new.history[-1]["updates"] == 2


def test_silent_participant_is_presumed_offline_before_the_deadline(fleet):
    bus = fleet(3, rounds=2, evaluate=False, silent=("slave-2",),
                policy={"min_slaves": 3, "deadline": 100.0, "silence_timeout": 10.0})
    master = bus.nodes["master"].core
    assert master.version == 0
    bus.tick(11.0)
    assert not master.slaves["slave-2"].online
    statuses = [fx.data for fx in bus.json_log if fx.topic.endswith("/status")]
    assert any(st["slaves"].get("slave-2", {}).get("online") is False for st in statuses)
    assert statuses[-1]["state"] == "finished" and statuses[-1]["slaves"]["slave-2"]["online"] is None
    # round 1 closed with the two that answered; round 2 was planned without the silent one
    assert bus.finished and [row["updates"] for row in master.history] == [2, 2]
