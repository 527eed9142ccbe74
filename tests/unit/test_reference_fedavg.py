"""In-process FedAvg on the reference workload of DESIGN.md: the correctness baseline.

Model spec → local training → ClientUpdate → strategy → validated load, with no transport
in between. A distributed run of the same split should track these numbers closely.
"""

from __future__ import annotations

from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.workload import evaluate, reference_split
from fedmq.slave.trainer import train_local

ROUNDS = 30


def run_reference_fedavg(rounds: int) -> list[float]:
    """Test accuracy of the global model after each round."""
    split = reference_split(num_slaves=8, alpha=0.5, seed=0)
    shards = [split.slave_dataset(i) for i in range(split.num_slaves)]
    test = split.test_dataset()
    model = build_model({"arch": "mlp", "sizes": [64, 128, 10], "seed": 0})
    strategy = make_strategy({"name": "fedavg"})
    accuracy = []
    for version in range(rounds):
        updates = []
        for i, shard in enumerate(shards):
            result = train_local(model, shard, kind="delta", epochs=2, batch_size=32, lr=0.1,
                                 seed=1000 * version + i)
            updates.append(ClientUpdate(sender=f"slave-{i}", kind=result.kind,
                                        tensors=result.tensors,
                                        num_samples=result.num_samples,
                                        base_version=version))
        new = strategy.aggregate(float_state(model), updates, version=version + 1)
        load_float_state(model, new)
        accuracy.append(evaluate(model, test)["accuracy"])
    return accuracy


def test_fedavg_on_the_reference_workload_learns_as_designed():
    accuracy = run_reference_fedavg(ROUNDS)
    # Measured with torch 2.13 CPU: 0.758 after round 6, 0.900 after 15, 0.933 after 30.
    assert accuracy[5] >= 0.70, accuracy
    assert accuracy[14] >= 0.85, accuracy
    assert accuracy[29] >= 0.90, accuracy
