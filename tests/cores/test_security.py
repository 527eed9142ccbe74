"""Attacks from an enrolled device or any broker account, against the cores (issue 11).

Each test performs the attack through the real code path (signed messages over the
in-memory bus) and checks that it is refused with a named reason and leaves the model alone.
"""

from __future__ import annotations

import json

import torch

from fedmq.common import messages as M
from fedmq.common.modelspec import float_state
from fedmq.common.tensors import encode_state_dict


def _send_update(bus, sender: str, *, uid: str, round: int, version: int, tensors: dict, samples: int = 10) -> None:
    node = bus.nodes[sender]
    topic = bus.cfg.topics.slave("update", sender)
    body = {"update_id": uid, "kind": "delta", "base_version": version, "samples": samples, "metrics": {},
            "tensors": encode_state_dict(tensors)}
    bus.queue.append((topic, node.sealer.seal(topic, M.UPDATE, body, now=bus.now, version=version, round=round), False))
    bus.pump()


def test_one_slave_cannot_fill_a_round_with_other_slaves_update_ids(fleet):
    bus = fleet(3, rounds=2, evaluate=False, silent=("slave-0", "slave-1", "slave-2"),
                policy={"min_slaves": 3, "quorum": 3})
    master = bus.nodes["master"].core
    zeros = {k: torch.zeros_like(v) for k, v in master.params.items()}
    for victim in ("slave-0", "slave-1", "slave-2"):
        _send_update(bus, "slave-2", uid=f"{victim}/1/0", round=1, version=0, tensors=zeros)
    assert master.version == 0 and master.round.answered == {"slave-2"}, "one update counted: its own"
    assert master.rejected["foreign_update"] == 2


def test_a_non_finite_aggregate_is_never_checkpointed_or_published(fleet):
    bus = fleet(2, rounds=3, evaluate=False, silent=("slave-0", "slave-1"), policy={"min_slaves": 2})
    master = bus.nodes["master"].core
    master.strategy.aggregate = lambda params, updates, version: {k: torch.full_like(v, float("inf"))
                                                                 for k, v in params.items()}
    zeros = {k: torch.zeros_like(v) for k, v in master.params.items()}
    before = len([fx for fx in bus.effects["master"] if type(fx).__name__ == "Checkpoint"])
    _send_update(bus, "slave-0", uid="slave-0/1/0", round=1, version=0, tensors=zeros)
    _send_update(bus, "slave-1", uid="slave-1/1/0", round=1, version=0, tensors=zeros)
    assert master.version == 0 and all(bool(torch.isfinite(v).all()) for v in master.params.values())
    assert len([fx for fx in bus.effects["master"] if type(fx).__name__ == "Checkpoint"]) == before
    assert master.rejected["non_finite_aggregate"] == 2
    status = bus.json["fedmq/digits/status"]
    assert status["discarded"][-1]["update_ids"] == ["slave-0/1/0", "slave-1/1/0"]
    assert master.round is not None and master.round.number == 2, "a new round: the slaves train again"


def test_thirty_thousand_made_up_names_do_not_grow_the_status_past_a_packet(fleet):
    bus = fleet(1, rounds=1, evaluate=False, silent=("slave-0",), policy={"min_slaves": 1})
    master = bus.nodes["master"].core
    for i in range(30_000):
        master.on_rejected("unknown_kid", f"intruder-{i:05d}-" + "x" * 40, bus.now)
    bus.tick(2.0)
    status = bus.json["fedmq/digits/status"]
    assert len(json.dumps(status)) < 64 * 1024
    assert len(status["not_enrolled"]) == 50 and status["not_enrolled_more"] == 9_950
    assert status["rejected"]["unknown_kid"] == 30_000


def test_a_decline_reason_of_megabytes_is_shown_shortened(fleet):
    bus = fleet(1, rounds=1, evaluate=False, silent=("slave-0",), policy={"min_slaves": 1})
    node = bus.nodes["slave-0"]
    topic = bus.cfg.topics.slave("confirm", "slave-0")
    body = {"public_key": node.core.public_key, "reason": "z" * 2_000_000}
    node.sealer.chunk_size = 4 * 1024 * 1024
    bus.queue.append((topic, node.sealer.seal(topic, M.DECLINE, body, now=bus.now), False))
    bus.pump()
    bus.tick(2.0)
    shown = bus.json["fedmq/digits/status"]["slaves"]["slave-0"]["declined"]
    assert len(shown) == 200 and shown.endswith("…")


def test_a_slave_refuses_a_model_of_another_run_signed_by_the_master(fleet):
    bus = fleet(1, rounds=1, evaluate=False, silent=("slave-0",), policy={"min_slaves": 1})
    slave = bus.nodes["slave-0"].core
    master = bus.nodes["master"]
    poisoned = {k: torch.zeros_like(v) for k, v in float_state(slave.model).items()}
    topic = bus.cfg.topics.master("model")
    body = {"run": "an-earlier-run", "tensors": encode_state_dict(poisoned)}
    bus.queue.append((topic, master.sealer.seal(topic, M.MODEL, body, now=bus.now, version=50), False))
    bus.pump()
    assert slave.version == 0
