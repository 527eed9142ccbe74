"""Compressed both ways, end to end: real Mosquitto, real master and slave processes, a slave killed and back.

The reference workload (8 non-IID slaves, MLP, FedAvg, 30 rounds) with the job's
`[compression] preset = PRESET`: compressed updates with error feedback up, model
deltas down. One slave is SIGKILLed mid-run and started again at once; the master
keeps the round open for it (`offline_grace`), gives it the devices' model on its own
topic when it is back, and it follows the deltas from there. The final accuracy must
be within one point of uncompressed FedAvg on the same split, computed here in-process
(a distributed run of it gives the same accuracy in every round: docs/BENCHMARKS.md).

Which preset: the one-point margin at round 30 is not reachable with top-1 % uplink
(docs/BENCHMARKS.md, "Compression (in-process)" and "vs Flower": top-1 % + int8 + error
feedback ends 1.4 to 2.2 points below uncompressed FedAvg, whatever the downlink;
top-5 % about one point, top-10 % 0.5, all within a 360-digit test set's noise of the
line). The preset that meets it with a margin is `int8`: int8 updates (3.9x smaller)
with error feedback, and int8 model deltas down (3x smaller) between keyframes.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.workload import evaluate, reference_split
from fedmq.demo import LocalFleet, Watcher
from fedmq.slave.trainer import train_local

from support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(420)]

PRESET = "int8"
ROUNDS, SLAVES, VICTIM, KILL_AT = 30, 8, "slave-03", 10


def uncompressed_fedavg(rounds: int) -> list[float]:
    """Accuracy per round of in-process FedAvg with the slaves' own seeds (round number).
    One torch thread: next to nine busy processes, more only contend (minutes, not seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fedavg(rounds)
    finally:
        torch.set_num_threads(threads)


def _fedavg(rounds: int) -> list[float]:
    split = reference_split(num_slaves=SLAVES)
    shards, test = [split.slave_dataset(i) for i in range(SLAVES)], split.test_dataset()
    model = build_model({"arch": "mlp", "sizes": [64, 128, 10], "seed": 0})
    strategy = make_strategy({"name": "fedavg"})
    accuracy = []
    for version in range(rounds):
        updates = []
        for i, shard in enumerate(shards):
            r = train_local(model, shard, kind="delta", epochs=2, batch_size=32, lr=0.1, seed=version + 1)
            updates.append(ClientUpdate(sender=f"slave-{i}", kind=r.kind, tensors=r.tensors,
                                        num_samples=r.num_samples, base_version=version))
        load_float_state(model, strategy.aggregate(float_state(model), updates, version=version + 1))
        accuracy.append(evaluate(model, test)["accuracy"])
    return accuracy


def npz_fleet(root: Path, broker: dict, job: dict) -> LocalFleet:
    """A fleet whose slaves read their shard from an .npz (no scikit-learn import per slave)."""
    split, data = reference_split(num_slaves=SLAVES), root / "data"
    data.mkdir(parents=True)
    overrides = {}
    for i in range(SLAVES):
        x, y = split.slave_dataset(i).tensors
        np.savez(data / f"slave-{i:02d}.npz", x=x.numpy(), y=y.numpy())
        overrides[f"slave-{i:02d}"] = {"slave": {"data": f"../data/slave-{i:02d}.npz"}}
    x, y = split.test_dataset().tensors
    np.savez(data / "test.npz", x=x.numpy(), y=y.numpy())
    return LocalFleet(root, broker, slaves=SLAVES, rounds=ROUNDS, slave_overrides=overrides,
                      job={**job, "master": {"eval": "../data/test.npz"}})




def test_compressed_job_with_a_slave_killed_and_back_stays_within_a_point_of_fedavg(mosquitto, tmp_path: Path):
    fleet = npz_fleet(tmp_path / "fleet", mosquitto.settings, {
        "compression": {"preset": PRESET},
        # a slave that went away is waited for (its restart takes seconds): the round stays open
        "rounds": {"min_slaves": SLAVES, "deadline": 120.0, "offline_grace": 120.0},
    })
    watch = Watcher(mosquitto.settings)
    try:
        fleet.start_all()
        wait_for(lambda: len(watch.rows) >= KILL_AT, 240, f"version {KILL_AT}")
        fleet.signal(VICTIM, signal.SIGKILL)
        killed_at = max(r["version"] for r in watch.rows)
        log = tmp_path / "fleet" / "logs" / f"{VICTIM}.log"
        offset = log.stat().st_size
        fleet.start(VICTIM)
        assert fleet.procs["master"].wait(timeout=300) == 0, fleet.log("master")[-3000:]
        wait_for(lambda: watch.status.get("state") == "finished", 30, "the final status")
    finally:
        fleet.stop_all()
        watch.close()

    reference = uncompressed_fedavg(ROUNDS)
    rows = sorted(watch.rows, key=lambda r: r["version"])
    assert [r["version"] for r in rows] == list(range(1, ROUNDS + 1))
    after = log.read_bytes()[offset:].decode(errors="replace")
    # Back: the full model of what devices hold, on its own topic, then deltas (and the
    # keyframes the preset sends every few versions) to the end.
    full = [int(v) for v in re.findall(r"model version (\d+)\n", after)]
    deltas = [int(v) for v in re.findall(r"model version (\d+) \(delta\)", after)]
    assert full and deltas, after[-3000:]
    assert min(deltas) == min(full) + 1 and max(full + deltas) == ROUNDS, (full, deltas)
    assert "sent delta update" in after, after[-3000:]
    used = [r["version"] for r in rows if any(u.startswith(f"{VICTIM}/") for u in r["update_ids"])]
    assert max(used) == ROUNDS and any(v > killed_at + 1 for v in used), used
    assert watch.status["downlink"]["deltas"] > 0
    traffic = watch.status["traffic"]
    assert traffic["down"]["delta"] > 0 and traffic["up"]["update"] > 0

    final, dense = rows[-1]["accuracy"], reference[-1]
    print(f"\n{PRESET}: final accuracy {final:.4f}, uncompressed FedAvg {dense:.4f} ({100 * (final - dense):+.2f} "
          f"points); {VICTIM} killed after version {killed_at}, back with a full model at {min(full)}, "
          f"then {len(deltas)} deltas; traffic {traffic}")
    assert final >= dense - 0.01, ([round(r["accuracy"], 4) for r in rows], [round(a, 4) for a in reference])
