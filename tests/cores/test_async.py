"""Asynchronous strategies in the master core (FedBuff, FedAsync, gradient push), over the in-memory bus."""

from __future__ import annotations

import pytest

from fedmq.common.async_strategies import FedAsync, FedBuff, GradPush, Staleness, make_async_strategy
from fedmq.common.errors import ConfigError
from fedmq.common.jobconfig import TrainSettings
from fedmq.common.strategies import ClientUpdate

import torch


def test_staleness_functions() -> None:
    assert Staleness("constant")(7) == 1.0
    assert Staleness("polynomial", a=0.5)(3) == pytest.approx(0.5)
    hinge = Staleness("hinge", a=1.0, b=2.0)
    assert hinge(2) == 1.0 and hinge(4) == pytest.approx(1 / 3)


def _update(delta: float, base: int, kind: str = "delta") -> ClientUpdate:
    return ClientUpdate("s", kind, {"w": torch.full((2,), delta)}, 10, base)


def test_fedbuff_applies_mean_of_staleness_weighted_deltas_every_k() -> None:
    fb = FedBuff(buffer_size=2, server_lr=1.0, max_staleness=4)
    params = {"w": torch.zeros(2)}
    assert fb.add(params, _update(1.0, base=5), version=5, base=None) is None
    new = fb.add(params, _update(1.0, base=2), version=5, base=None)  # tau 3: weight 1/2
    assert torch.allclose(new["w"], torch.full((2,), (1.0 + 0.5) / 2))
    assert fb.add(params, _update(1.0, base=5), version=5, base=None) is None  # the flush emptied the buffer
    assert fb.admissible(_update(1.0, base=0), version=5) is not None  # tau 5 > 4


def test_fedasync_mixes_in_the_slave_model_of_its_base_version() -> None:
    fa = FedAsync(alpha=0.5, staleness=Staleness("constant"))
    params, base = {"w": torch.full((2,), 4.0)}, {"w": torch.zeros(2)}
    new = fa.add(params, _update(2.0, base=0), version=1, base=base)  # slave model = 0 + 2
    assert torch.allclose(new["w"], torch.full((2,), 3.0))


def test_gradpush_steps_against_the_gradient_and_refuses_deltas() -> None:
    gp = GradPush(lr=0.5, staleness=Staleness("polynomial", a=1.0))
    new = gp.add({"w": torch.ones(2)}, _update(2.0, base=0, kind="gradient"), version=1, base=None)
    assert torch.allclose(new["w"], torch.ones(2) - 0.5 * 0.5 * 2.0)
    assert "gradient" in gp.admissible(_update(1.0, base=1), version=1)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="strategy.momentum"):
        make_async_strategy({"name": "fedbuff", "momentum": 0.9})
    with pytest.raises(ConfigError, match="strategy.staleness"):
        make_async_strategy({"name": "fedasync", "staleness": "linear"})


SPEEDS = {0: 1.0, 1: 1.3, 2: 5.0, 3: 1.1}  # simulated seconds of local training; slave-2 is a straggler


@pytest.mark.parametrize("strategy, update, lr, versions, expect", [
    ({"name": "fedbuff", "buffer_size": 3}, "delta", 0.1, 30, 0.7),
    ({"name": "fedasync", "alpha": 0.4}, "delta", 0.1, 40, 0.4),
    ({"name": "gradpush", "lr": 0.5}, "gradient", 0.1, 40, 0.4),
])
def test_async_jobs_learn_without_waiting_for_the_straggler(fleet, strategy, update, lr, versions, expect):
    bus = fleet(4, rounds=versions, strategy=strategy, update=update, train=TrainSettings(epochs=1, lr=lr),
                policy={"min_slaves": 4}, train_time=SPEEDS, run_for=400)
    master = bus.nodes["master"].core
    assert bus.finished and master.version == versions
    accs = [r["accuracy"] for r in master.history]
    # one non-IID client per version makes single versions noisy: judge the last ten
    assert max(accs[-10:]) >= expect and sum(accs[-10:]) / 10 > accs[0] + 0.15, accs
    assert any(row.get("staleness_max", 0) > 0 for row in master.history), "updates arrived on older versions"
    # a synchronous round waits for the 5 s straggler; asynchronous versions come far faster
    assert bus.now - 1000.0 < versions * 5.0 / 2


def test_updates_past_max_staleness_are_not_used(fleet):
    bus = fleet(4, rounds=8, strategy={"name": "fedbuff", "buffer_size": 2, "max_staleness": 0},
                train=TrainSettings(epochs=1), policy={"min_slaves": 4}, train_time=SPEEDS, run_for=200)
    master = bus.nodes["master"].core
    assert bus.finished and master.rejected.get("stale", 0) > 0
    assert all(row.get("staleness_max", 0) == 0 for row in master.history)


def test_fedbuff_keeps_buffered_update_ids_while_no_slave_is_online(fleet):
    """The deadline passing with every slave offline must not forget which updates the
    strategy has buffered, nor drop an update that comes while no round is open: a
    re-sent update would count twice, a fresh one would be lost."""
    from fedmq.common import messages as M
    from fedmq.common.effects import Publish

    bus = fleet(2, rounds=1, strategy={"name": "fedbuff", "buffer_size": 2}, train=TrainSettings(epochs=1),
                policy={"min_slaves": 2, "deadline": 10.0}, train_time={0: 1.0, 1: 30.0})
    master = bus.nodes["master"].core
    bus.advance(bus.now + 2)  # slave-0's update is buffered; slave-1 still trains
    first = bus.nodes["slave-0"].core.pending["body"]
    assert first["update_id"] in master.round.updates
    for name in ("slave-0", "slave-1"):  # both vanish: their wills say offline
        bus.run(name, [Publish(master.topics.slave("presence", name), M.PRESENCE,
                               {"state": "offline", "version": 0}, retain=True)])
    bus.pump()
    bus.advance(bus.now + 15)  # past the deadline, with nobody to re-plan the round with
    # slave-0 comes back and re-sends its update (as after a restart); then slave-1's arrives
    bus.run("slave-0", [Publish(master.topics.slave("update", "slave-0"), M.UPDATE, first, version=0, round=1)])
    bus.pump()
    bus.advance(bus.now + 30)
    assert bus.finished and master.duplicates == 1
    assert master.history[0]["update_ids"] == sorted([first["update_id"], "slave-1/1/0"])
