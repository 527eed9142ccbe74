"""Write docs/vectors/: one signed sample of every message kind, exactly as published.

Run by hand when the protocol changes (`python tools/make_vectors.py`); the test
suite only checks that the committed vectors still verify and decode. Keys come
from fixed seeds so a regeneration is byte-identical (Ed25519 is deterministic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.common import messages as M
from fedmq.common.channel import Sealer
from fedmq.common.compression import (
    compress_tensors,
    delta_body,
    encode_model_delta,
    encode_update,
    params_digest,
)
from fedmq.common.compression_settings import (
    Downlink,
    Uplink,
    preset,
)
from fedmq.common.jobconfig import parse_job
from fedmq.common.keys import Identity, public_pem, raw_public_bytes
from fedmq.common.layout import Layout
from fedmq.common.tensors import encode_quantized, encode_sparse, encode_state_dict
from fedmq.common.topics import Topics
from fedmq.master.job import instruction_body
from fedmq.master.partial import PartialSum, Tallied, partial_body, weights_to_wire

OUT = Path(__file__).resolve().parent.parent / "docs" / "vectors"
NOW = 1_790_000_000.0  # fixed clock
RUN = "0f3c2a9e5d1b"  # a fixed run id
JOB = "digits"
CHUNK = 4096  # small, so the model vector shows chunking
ENCODER = {"arch": "mlp", "sizes": [64, 16], "relu_last": True, "seed": 0}  # a shared encoder and two heads
HEADS = {"digit": {"arch": "mlp", "sizes": [16, 10], "seed": 1}, "parity": {"arch": "mlp", "sizes": [16, 2], "seed": 2}}


def identity(name: str) -> Identity:
    seed = hashlib.sha256(f"fedmq test vector {name}".encode()).digest()
    return Identity(name, Ed25519PrivateKey.from_private_bytes(seed))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.cbor"):
        old.unlink()
    topics = Topics(JOB)
    master, slave, worker = identity("master"), identity("slave-01"), identity("w1")
    for ident in (master, slave, worker):
        (OUT / f"{ident.name}.pub").write_bytes(public_pem(ident.public_key))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    spec = {"arch": "mlp", "sizes": [64, 16, 10], "seed": 0}
    ms = Sealer(master, JOB, seq=1, chunk_size=CHUNK)
    ss = Sealer(slave, JOB, seq=1, chunk_size=CHUNK)
    ws = Sealer(worker, JOB, seq=1, chunk_size=CHUNK)
    pub = raw_public_bytes(slave.public_key)
    w1 = weights["0.weight"]
    g = torch.Generator().manual_seed(1)
    change = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in weights.items()}  # a trained delta's stand-in
    half = {**compress_tensors({k: change[k] for k in ("0.weight", "2.bias")}, Uplink(quantize="float16"))[0],
            **compress_tensors({k: change[k] for k in ("0.bias", "2.weight")},
                               Uplink(topk=0.25, quantize="bfloat16"))[0]}
    newer = {k: v + change[k] for k, v in weights.items()}
    multitask = Layout.multitask(ENCODER, HEADS)
    torch.manual_seed(0)
    composite = {k: v.detach() for k, v in multitask.build().state_dict().items()}
    model_delta, _ = encode_model_delta(weights, newer, Downlink(delta=True, topk=0.1, quantize="int8", block=64))

    def update(name: str, tensors: dict) -> tuple:
        return (ss, name, topics.slave("update", "slave-01"), M.UPDATE, {
            "update_id": "slave-01/4/4", "kind": "delta", "base_version": 4, "samples": 180,
            "metrics": {"loss": 0.42, "seconds": 0.31}, "tensors": tensors}, 4, 4)
    samples = [
        (ms, "instruction", topics.master("instruction"), M.INSTRUCTION, instruction_body(parse_job({
            "job": {"id": JOB, "task": "digits"}, "model": spec, "enrollment": {"mode": "open"},
            "master": {"key": "master.key"}, "rounds": {"participants": 8},
        }, OUT), RUN), 0, 0),
        (ss, "confirm", topics.slave("confirm", "slave-01"), M.CONFIRM, {
            "public_key": pub, "samples": 180, "capabilities": {"update": ["delta", "gradient"], "torch": "2.13.0"},
        }, 0, 0),
        (ss, "decline", topics.slave("confirm", "slave-01"), M.DECLINE, {
            "public_key": pub, "reason": "no local samples for task 'digits'",
        }, 0, 0),
        (ms, "model", topics.master("model"), M.MODEL, {"run": RUN, "tensors": encode_state_dict(weights)}, 3, 3),
        (ms, "model-direct", topics.direct("slave-01"), M.MODEL, {"run": RUN, "tensors": encode_state_dict(weights)},
         3, 0),
        (ms, "delta", topics.master("delta"), M.DELTA, {"run": RUN, "base_version": 3, "base_digest": params_digest(weights),
                                                        "tensors": {
            "0.weight": encode_sparse(w1.shape, torch.tensor([0, 5, 77], dtype=torch.int32), torch.tensor([0.5, -0.25, 0.125])),
            "2.weight": encode_quantized(torch.tensor([[1, -3] * 8] * 10, dtype=torch.int8), 0.01, 0),
        }}, 4, 4),
        (ms, "round", topics.master("round"), M.ROUND, {
            "run": RUN, "participants": ["slave-01", "slave-02"], "received": ["slave-02"], "deadline": NOW + 60.0,
            "update": "delta",
        }, 4, 4),
        (ss, "update", topics.slave("update", "slave-01"), M.UPDATE, {
            "update_id": "slave-01/4/4", "kind": "delta", "base_version": 4, "samples": 180,
            "metrics": {"loss": 0.42, "seconds": 0.31},
            "tensors": encode_state_dict({k: torch.full_like(v, 0.001) for k, v in weights.items()}),
        }, 4, 4),
        (ss, "presence", topics.slave("presence", "slave-01"), M.PRESENCE, {"state": "online", "version": 4}, 4, 0),
        # compressed forms (PROTOCOL.md 8, 14.2); appended so the vectors above keep their bytes
        update("update-topk", encode_update(change, preset("topk").uplink)),
        update("update-int8", encode_update(change, preset("int8").uplink)),
        update("update-half", half),
        (ms, "delta-q8", topics.master("delta"), M.DELTA, {"run": RUN, **delta_body(3, weights, model_delta)}, 4, 4),
        (ms, "reconfirm", topics.direct("slave-01"), M.RECONFIRM, {"run": RUN, "reason": "not enrolled"}, 0, 0),
        # models with parts (PROTOCOL.md 11.8, 11.9), appended likewise
        (ms, "instruction-distill", topics.master("instruction"), M.INSTRUCTION, instruction_body(parse_job({
            "job": {"id": JOB, "task": "digits", "update": "student"}, "model": spec, "enrollment": {"mode": "open"},
            "master": {"key": "master.key"}, "distill": {"teacher": "teacher.cbor", "students": {
                "same": spec, "half": {"arch": "mlp", "sizes": [64, 8, 10], "seed": 0}}},
        }, OUT), RUN), 0, 0),
        (ms, "instruction-multitask", topics.master("instruction"), M.INSTRUCTION, instruction_body(parse_job({
            "job": {"id": JOB, "task": "digits"}, "model": ENCODER, "enrollment": {"mode": "open"},
            "master": {"key": "master.key"}, "multitask": {"tasks": ["digit", "parity"], "heads": HEADS},
        }, OUT), RUN), 0, 0),
        (ss, "confirm-parts", topics.slave("confirm", "slave-01"), M.CONFIRM, {
            "public_key": pub, "samples": 180, "capabilities": {"update": ["delta"], "torch": "2.13.0"},
            "parts": {"encoder": 180, "heads.digit": 120, "heads.parity": 60},
        }, 0, 0),
        (ms, "model-part", topics.model_part("heads.parity"), M.MODEL,
         {"run": RUN, "tensors": encode_state_dict(multitask.select(composite, ["heads.parity"]))}, 3, 3),
        (ss, "update-parts", topics.slave("update", "slave-01"), M.UPDATE, {
            "update_id": "slave-01/4/4", "kind": "delta", "base_version": 4, "samples": 120,
            "metrics": {"loss": 0.42, "seconds": 0.31},
            "tensors": encode_state_dict({k: torch.full_like(v, 0.001) for k, v in
                                          multitask.select(composite, ["encoder", "heads.digit"]).items()}),
            "parts": {"encoder": 120, "heads.digit": 120},
        }, 4, 4),
        # sharded jobs (PROTOCOL.md 9.9, 11.10), appended likewise: worker w1 holds slave-01's update of round 4
        (ws, "tally", topics.worker("w1"), M.TALLY, {"run": RUN, "updates": [
            Tallied("slave-01/4/4", "slave-01", "delta", 180, 52_000).to_wire()]}, 4, 4),
        (ms, "collect", topics.master("collect"), M.COLLECT, {"run": RUN, "collect": 1, "deadline": NOW + 60.0,
                                                              "assign": {"w1": weights_to_wire({"slave-01/4/4": 180.0})}},
         4, 4),
        (ws, "partial", topics.worker("w1"), M.PARTIAL, partial_body(RUN, 1, PartialSum(
            {k: 180.0 * v for k, v in change.items()}, 180.0, {"slave-01/4/4": 180.0})), 4, 4),
    ]
    index = []
    for sealer, name, topic, kind, body, version, rnd in samples:
        payloads = sealer.seal(topic, kind, body, now=NOW, version=version, round=rnd)
        key = f"{sealer.identity.name}.pub"
        for i, payload in enumerate(payloads):
            fname = f"{name}.cbor" if len(payloads) == 1 else f"{name}.{i:03d}.cbor"
            (OUT / fname).write_bytes(payload)
            entry = {"file": fname, "topic": topic, "public_key": key, "kind": kind}
            if len(payloads) > 1:
                entry["chunk"] = [i, len(payloads)]
            index.append(entry)
    (OUT / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} payloads to {OUT}")


if __name__ == "__main__":
    main()
