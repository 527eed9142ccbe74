"""Compression benchmark: FedAvg on the reference workload, in-process, with and without compression.

Run by hand:  python bench/compression.py  [--rounds 30] [--only NAME,NAME...] [--json]

The reference workload of DESIGN.md (digits, 8 non-IID slaves, MLP 64-128-10, 2 local
epochs, batch 32, lr 0.1, FedAvg weighted by samples; the same seeds as
tests/unit/test_reference_fedavg.py), with no broker in between but every update and
every model/delta really encoded, CBOR-serialised and decoded:

* uplink: each slave's delta goes through `compression.encode_update` (with its own
  `ErrorFeedback` when the settings say so), `cbor2.dumps`, `cbor2.loads`,
  `decode_state_dict` + `as_float32_state`; the master aggregates what it decoded;
* downlink: without deltas every slave receives the master's model (dense float32);
  with deltas a `DeviceModel` chooses keyframe or delta each version, and slaves train
  from what they would hold (keyframe + applied deltas), not from the master's model;
* constraints: `train_local`'s l1_mu / change_budget / change_threshold, and prox_mu.

Bytes are `len(cbor2.dumps(tensors))` of the wire `tensors` map (what dominates a
message; the envelope adds ~300 B): "up" is the mean per update, "down" the mean per
version sent to devices (one broadcast). Ratios are dense bytes / compressed bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import torch

from fedmq.common.compression import (
    DeviceModel,
    ErrorFeedback,
    Keyframe,
    apply_model_delta,
    encode_update,
)
from fedmq.common.compression_settings import (
    CompressionSettings,
    Constraints,
    Uplink,
    preset,
)
from fedmq.common.modelspec import build_model, float_state, load_float_state
from fedmq.common.strategies import ClientUpdate, make_strategy
from fedmq.common.tensors import as_float32_state, decode_state_dict, encode_state_dict, spec_of
from fedmq.common.workload import evaluate, reference_split
from fedmq.slave.trainer import train_local

SPEC = {"arch": "mlp", "sizes": [64, 128, 10], "seed": 0}
TARGET = 0.90


@dataclass(frozen=True)
class Case:
    name: str
    settings: CompressionSettings = field(default_factory=CompressionSettings)
    prox_mu: float = 0.0
    plain: bool = False  # today's encoder: encode_state_dict, no compression module at all


TOPK_INT8 = Uplink(topk=0.01, quantize="int8", block=256, error_feedback=True)
INT8 = Uplink(quantize="int8", block=256)
CASES = [
    Case("dense", plain=True),
    Case("int8+EF", CompressionSettings(uplink=preset("int8").uplink)),
    Case("int8 per-tensor no-EF", CompressionSettings(uplink=Uplink(quantize="int8"))),
    Case("top10%+int8+EF", CompressionSettings(uplink=replace(TOPK_INT8, topk=0.1))),
    Case("top1%+int8+EF", CompressionSettings(uplink=TOPK_INT8)),
    Case("top1%+int8 no-EF", CompressionSettings(uplink=replace(TOPK_INT8, error_feedback=False))),
    Case("prox_mu=0.1", prox_mu=0.1),
    Case("l1_mu=1e-2", CompressionSettings(constraints=Constraints(l1_mu=1e-2))),
    Case("threshold 3e-3", CompressionSettings(constraints=Constraints(change_threshold=3e-3))),
    Case("threshold 1e-2", CompressionSettings(constraints=Constraints(change_threshold=1e-2))),
    Case("budget 10%", CompressionSettings(constraints=Constraints(change_budget=0.1))),
    Case("budget 1% +int8", CompressionSettings(uplink=INT8, constraints=Constraints(change_budget=0.01))),
    Case("down int8 deltas", CompressionSettings(downlink=preset("int8").downlink)),
    Case("down top5%+int8 deltas", CompressionSettings(downlink=preset("topk").downlink)),
    Case("preset int8", preset("int8")),
    Case("preset topk", preset("topk")),
]


def _nbytes(tensors: dict[str, Any]) -> int:
    return len(cbor2.dumps(tensors))


def run(case: Case, rounds: int = 30, num_slaves: int = 8) -> dict[str, Any]:
    """One federation; accuracy of the master's model and bytes per message, per round."""
    split = reference_split(num_slaves=num_slaves, alpha=0.5, seed=0)
    shards = [split.slave_dataset(i) for i in range(split.num_slaves)]
    test = split.test_dataset()
    master = build_model(SPEC)
    device_model = build_model(SPEC)  # what the slaves hold
    spec = spec_of(float_state(master))
    strategy = make_strategy({"name": "fedavg"})
    up, down = case.settings.uplink, case.settings.downlink
    feedback = [ErrorFeedback(up) if up.error_feedback else None for _ in shards]
    tracker = DeviceModel(down) if down.delta else None
    held: dict[str, torch.Tensor] = {}
    accuracy, bytes_up, bytes_down, keyframes = [], [], [], 0
    constraints = case.settings.constraints.train_kwargs()
    for version in range(rounds):
        weights = {k: v.clone() for k, v in float_state(master).items()}
        if tracker is None:
            held = weights
            bytes_down.append(_nbytes(encode_state_dict(weights)))
        else:
            sent = tracker.publish(version, weights)
            if isinstance(sent, Keyframe):
                keyframes += 1
                held = {k: v.clone() for k, v in sent.params.items()}
                bytes_down.append(_nbytes(encode_state_dict(sent.params)))
            else:
                wire = cbor2.loads(cbor2.dumps(sent.body))
                held = apply_model_delta(held, wire, held_version=version - 1)
                assert all(torch.equal(held[k], tracker.params[k]) for k in held), "device copy not exact"
                bytes_down.append(_nbytes(sent.body["tensors"]))
        load_float_state(device_model, held)
        updates = []
        for i, shard in enumerate(shards):
            result = train_local(device_model, shard, kind="delta", epochs=2, batch_size=32, lr=0.1,
                                 prox_mu=case.prox_mu, seed=1000 * version + i, **constraints)
            if case.plain:
                wire = encode_state_dict(result.tensors)
            else:
                wire = encode_update(result.tensors, up, feedback[i])
            raw = cbor2.dumps(wire)
            bytes_up.append(len(raw))
            tensors = as_float32_state(decode_state_dict(cbor2.loads(raw), expected=spec))
            updates.append(ClientUpdate(sender=f"slave-{i}", kind="delta", tensors=tensors,
                                        num_samples=result.num_samples, base_version=version))
        load_float_state(master, strategy.aggregate(float_state(master), updates, version=version + 1))
        accuracy.append(evaluate(master, test)["accuracy"])
    reached = next((r + 1 for r, a in enumerate(accuracy) if a >= TARGET), None)
    return {"name": case.name, "accuracy": accuracy, "final": accuracy[-1], "last5": sum(accuracy[-5:]) / 5,
            "rounds_to_target": reached,
            "bytes_up": sum(bytes_up) / len(bytes_up), "bytes_down": sum(bytes_down) / len(bytes_down),
            "keyframes": keyframes if tracker is not None else rounds}


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    lines = [f"| case | final acc | Δ vs {base['name']} | mean of last 5 (Δ) | rounds to {TARGET:.2f} | up B/update "
             f"| up ratio | down B/version | down ratio | keyframes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['final']:.3f} | {100 * (r['final'] - base['final']):+.1f} pt "
                     f"| {r['last5']:.3f} ({100 * (r['last5'] - base['last5']):+.1f}) "
                     f"| {r['rounds_to_target'] or '—'} | {r['bytes_up']:,.0f} | {base['bytes_up'] / r['bytes_up']:.1f}× "
                     f"| {r['bytes_down']:,.0f} | {base['bytes_down'] / r['bytes_down']:.1f}× | {r['keyframes']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--only", default="", help="comma-separated case names (the first is the baseline)")
    ap.add_argument("--json", action="store_true", help="also print one line of JSON with every curve")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {', '.join(by_name)}")
    cases = [by_name[n] for n in names] if names else CASES
    torch.set_num_threads(1)
    results = []
    for case in cases:
        start = time.perf_counter()
        results.append(run(case, args.rounds))
        print(f"{case.name}: final {results[-1]['final']:.3f} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
