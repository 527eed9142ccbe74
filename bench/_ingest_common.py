"""Shared by bench/ingest.py and its publisher processes (bench/_ingest_pub.py).

Model sizes, synthetic update tensors (dense, top-k COO, int8-quantized) and the
update body a slave would send, so the publishers, the in-process harness and the
limit measurement all work on exactly the same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedmq.common import messages as M
from fedmq.common.channel import Sealer
from fedmq.common.modelspec import build_model, float_state
from fedmq.common.tensors import encode_quantized, encode_sparse, encode_state_dict

JOB = "ingest"
SAMPLES = 10

#: name -> MLP layer sizes (weights + biases: 9,610 / 101,770 / 1,000,900 / 9,987,400 parameters)
SIZES: dict[str, list[int]] = {
    "10k": [64, 128, 10],
    "100k": [784, 128, 10],
    "1m": [1000, 990, 10],
    "10m": [4000, 2490, 10],
}
MODES = ("dense", "coo", "q8")
COO_FRACTION = 0.01


def model_spec(size: str) -> dict[str, Any]:
    return {"arch": "mlp", "sizes": SIZES[size], "seed": 0}


def param_count(size: str) -> int:
    s = SIZES[size]
    return sum(a * b + b for a, b in zip(s, s[1:]))


def encoded_update(size: str, mode: str, seed: int = 0) -> dict[str, Any]:
    """The `tensors` map of one update: a small random delta, encoded once.

    dense: float32 RFC 8746 arrays; coo: the top 1 % by magnitude of each tensor
    (int32 flat indices + float32 values, `encode_sparse`); q8: int8 codes with a
    scale and zero point (`encode_quantized`).
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in float_state(build_model(model_spec(size))).items()}
    out: dict[str, Any] = {}
    for name, shape in shapes.items():
        delta = torch.randn(shape, generator=g) * 1e-3
        if mode == "dense":
            out[name] = delta
        elif mode == "coo":
            flat = delta.reshape(-1)
            k = max(1, math.ceil(flat.numel() * COO_FRACTION))
            idx = flat.abs().topk(k).indices.sort().values
            out[name] = encode_sparse(shape, idx.to(torch.int32), flat[idx].contiguous())
        elif mode == "q8":
            scale = float(delta.abs().max()) / 127 or 1.0
            codes = torch.clamp(torch.round(delta / scale), -127, 127).to(torch.int8)
            out[name] = encode_quantized(codes, scale, 0)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return encode_state_dict(out)


def update_body(name: str, rnd: int, tensors: dict[str, Any]) -> dict[str, Any]:
    """What `SlaveCore.on_trained` sends for round `rnd` (base version rnd - 1)."""
    version = rnd - 1
    return {"update_id": f"{name}/{rnd}/{version}", "kind": "delta", "base_version": version,
            "samples": SAMPLES, "metrics": {"train_loss": 0.5, "bytes_in": 0}, "tensors": tensors}


def seal_update(sealer: Sealer, topic: str, rnd: int, tensors: dict[str, Any], now: float) -> list[bytes]:
    body = update_body(sealer.identity.name, rnd, tensors)
    return sealer.seal(topic, M.UPDATE, body, now=now, version=rnd - 1, round=rnd)
