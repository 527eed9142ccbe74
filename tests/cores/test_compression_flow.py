"""Compressed updates and downlink deltas through the cores (issue 13), over the in-memory bus."""

from __future__ import annotations

import torch

from fedmq.common import messages as M
from fedmq.common.compression_settings import preset
from fedmq.common.effects import Publish
from fedmq.common.modelspec import float_state


def test_topk_updates_and_delta_downlink_keep_every_device_exactly_on_the_masters_device_model(fleet):
    bus = fleet(4, rounds=12, compression=preset("topk"), policy={"min_slaves": 4})
    master = bus.nodes["master"].core
    assert bus.finished and master.version == 12
    assert master.publisher.deltas_sent > 0 and master.publisher.keyframes_sent >= 1
    held = master.publisher.devices.params
    for name in ("slave-0", "slave-1", "slave-2", "slave-3"):
        slave = bus.nodes[name].core
        assert slave.version == 12
        assert all(torch.equal(float_state(slave.model)[k], held[k]) for k in held), name
        assert slave.feedback is not None and slave.feedback.norm() > 0, "error feedback carries what top-k left out"
    updates = [fx for fx in bus.effects["slave-0"] if isinstance(fx, Publish) and fx.kind == M.UPDATE]
    assert all("coo" in item for fx in updates for item in fx.body["tensors"].values()), "sparse on the wire"
    status = bus.json["fedmq/digits/status"]
    assert status["downlink"]["deltas"] == master.publisher.deltas_sent and status["downlink"]["drift"] <= 0.05
    assert master.history[-1]["accuracy"] > 0.5


def test_error_feedback_survives_a_slave_restart(fleet):
    bus = fleet(2, rounds=6, compression=preset("topk"), train_time={0: 1.0, 1: 1.0}, policy={"min_slaves": 2})
    bus.advance(bus.now + 3.5)
    before = bus.nodes["slave-0"].core.feedback
    residual = {k: v.clone() for k, v in before.residual.items()}
    bus.restart_slave("slave-0")
    after = bus.nodes["slave-0"].core.feedback
    assert after is not before and set(after.residual) == set(residual)
    assert all(torch.equal(after.residual[k], residual[k]) for k in residual)
    bus.advance(bus.now + 20.0)
    assert bus.finished


def test_a_delta_against_another_base_is_ignored_until_a_full_model_comes(fleet):
    bus = fleet(1, rounds=3, evaluate=False, silent=("slave-0",), compression=preset("int8"), policy={"min_slaves": 1})
    slave = bus.nodes["slave-0"].core
    master = bus.nodes["master"]
    topic = bus.cfg.topics.master("delta")
    body = {"run": master.core.run, "base_version": 7, "base_digest": b"\0" * 16, "tensors": {}}
    bus.queue.append((topic, master.sealer.seal(topic, M.DELTA, body, now=bus.now, version=8), False))
    bus.pump()
    assert slave.version == 0
    logs = [fx.message for fx in bus.effects["slave-0"] if type(fx).__name__ == "Log"]
    assert any("delta to version 8 not applied" in m for m in logs)
