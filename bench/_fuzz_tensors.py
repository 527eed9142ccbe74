"""Hostile `tensors` maps for bench/fuzz.py: each breaks one rule of docs/PROTOCOL.md section 8 and must be refused.

NaN/Inf and overflowing values, wrong shapes, names and dtypes, coo and q8 items that
lie about their sizes (bombs: a huge dense shape with one entry), unknown typed-array
tags, deep nesting. The other tensors of the map are valid, so the one bad item is
what the receiver must catch.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from cbor2 import CBORTag

from fedmq.common.tensors import encode_quantized, encode_sparse, encode_tensor

from _fuzz_mutations import random_cbor


def dense_with(shape: tuple[int, ...], fill: float | None, rng: random.Random, scale: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    t = torch.randn(shape, generator=g) * scale
    if fill is not None and t.numel():
        t.view(-1)[rng.randrange(t.numel())] = fill
    return t


def hostile_tensors(rng: random.Random, spec: dict[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    """A `tensors` map that must be refused (each game breaks one rule of section 8)."""
    names = list(spec)
    good = {n: encode_tensor(dense_with(s, None, rng)) for n, s in spec.items()}
    victim = rng.choice(names)
    shape = spec[victim]
    n = math.prod(shape)
    op = rng.randrange(24)
    t = dict(good)
    if op == 0:
        t[victim] = encode_tensor(dense_with(shape, rng.choice([math.nan, math.inf, -math.inf]), rng))
        return "tensor-nonfinite", t
    if op == 1:
        t[victim] = encode_tensor(dense_with(shape, rng.choice([1e38, -3.4e38, 3.4028234e38]), rng))
        return "tensor-1e38", t
    if op == 2:
        t = {k: encode_tensor(torch.full(s, 3.0e38)) for k, s in spec.items()}
        return "tensor-all-3e38", t
    if op == 3:
        t[victim] = encode_tensor(dense_with(shape, math.inf, rng).to(torch.float16))
        return "tensor-f16-inf", t
    if op == 4:
        t[victim] = encode_tensor(dense_with(shape, math.nan, rng).to(torch.bfloat16))
        return "tensor-bf16-nan", t
    if op == 5:
        q = torch.randint(-128, 128, shape, dtype=torch.int8)
        t[victim] = encode_quantized(q, rng.choice([1e38, 3.4e38]), 0)
        return "q8-overflow", t
    if op == 6:
        q = torch.randint(-128, 128, shape, dtype=torch.int8)
        item = encode_quantized(q, 0.01, 0)
        item["q8"]["scale"] = rng.choice([math.nan, math.inf, 1, "0.1", None])
        t[victim] = item
        return "q8-scale", t
    if op == 7:
        q = torch.zeros(shape, dtype=torch.int8)
        item = encode_quantized(q, 0.01, 0)
        item["q8"]["zero"] = rng.choice([128, -129, 2**63, 0.5, True])
        t[victim] = item
        return "q8-zero", t
    if op == 8:
        q = torch.zeros(shape, dtype=torch.int8)
        blocks = rng.choice([1, 2])
        block = rng.choice([0, -1, 1.5, "2", None]) if blocks == 1 else rng.choice([n, n * 10, 2**62])
        item = {"q8": {"scale": encode_tensor(torch.ones(blocks)), "zero": 0, "codes": encode_tensor(q),
                       "block": block}}  # no block, or two scales where one block covers the tensor
        t[victim] = item
        return "q8-block", t
    if op == 9:  # coo bomb: a huge dense shape with one entry
        dims = rng.choice([[8192, 8192], [64 * 1024 * 1024], [4096, 4096, 4], [2**31, 2**31], [0, 10**30], [2**63]])
        t[victim] = encode_sparse(tuple(dims), torch.tensor([0], dtype=torch.int64), torch.tensor([1.0]))
        return f"coo-bomb:{'x'.join(map(str, dims))}"[:40], t
    if op == 10:  # several bombs, each under the per-tensor limit, together over the model
        for k in names:
            t[k] = encode_sparse((8192, 8192), torch.tensor([1], dtype=torch.int64), torch.tensor([0.5]))
        return "coo-bomb-all", t
    if op == 11:
        idx = rng.choice([[n], [-1], [2**62], list(range(n + 1))])  # (duplicates are tolerated: PROTOCOL 8)
        vals = torch.ones(len(idx))
        t[victim] = encode_sparse(shape, torch.tensor(idx, dtype=torch.int64), vals)
        return "coo-index", t
    if op == 12:
        t[victim] = {"coo": {"shape": list(shape), "indices": encode_tensor(torch.tensor([0, 1], dtype=torch.int32)),
                             "values": rng.choice([encode_tensor(torch.ones(3)), encode_tensor(torch.ones(2, 1)),
                                                   encode_tensor(torch.tensor([math.nan, 0.0])), 1.0])}}
        return "coo-values", t
    if op == 13:
        new = list(shape)[::-1] if len(shape) > 1 else [shape[0] + 1]
        t[victim] = encode_tensor(dense_with(tuple(new), None, rng))
        return "shape-mismatch", t
    if op == 14:
        t[victim] = encode_tensor(dense_with(tuple(shape) + (1,), None, rng))
        return "shape-extra-dim", t
    if op == 15:
        del t[victim]
        return "tensor-missing", t
    if op == 16:
        t[victim + rng.choice(["x", ".extra", ""]) or "x"] = encode_tensor(torch.zeros(3))
        t["extra"] = encode_tensor(torch.zeros(3))
        return "tensor-extra", t
    if op == 17:
        t[victim] = encode_tensor(dense_with(shape, None, rng).to(rng.choice([torch.float64, torch.int32, torch.uint8,
                                                                             torch.int8, torch.bool])))
        return "tensor-dtype", t
    if op == 18:  # typed array that disagrees with its shape, or an unknown typed-array tag
        data = dense_with(shape, None, rng).numpy().tobytes()
        t[victim] = rng.choice([CBORTag(40, [list(shape), CBORTag(85, data[:-4])]),
                                CBORTag(40, [list(shape), CBORTag(rng.choice([68, 76, 83, 87, 88]), data)]),
                                CBORTag(40, [list(shape), CBORTag(85, data), 1]),
                                CBORTag(40, [[float(d) for d in shape], CBORTag(85, data)]),
                                CBORTag(40, [list(shape), data]),
                                CBORTag(41, [list(shape), CBORTag(85, data)])])
        return "tensor-tag", t
    if op == 19:
        t[victim] = ["bfloat16", rng.choice([CBORTag(40, [list(shape), CBORTag(85, b"\x00" * 4 * n)]),
                                             CBORTag(40, [list(shape), CBORTag(69, b"\x00" * (2 * n - 2))]), "x"])]
        return "bf16-form", t
    if op == 20:
        t = {k: random_cbor(rng) for k in names} if rng.random() < 0.5 else random_cbor(rng)
        return "tensors-random", t if isinstance(t, dict) else {"x": t}
    if op == 21:
        t = {**good, **{f"t{i}": encode_tensor(torch.zeros(1)) for i in range(rng.choice([100, 5000]))}}
        return "tensors-many", t
    if op == 22:
        t[victim] = nested_tensor_item(rng.choice([10, 200]))
        return "tensor-deep", t
    t = {k: encode_tensor(torch.zeros(())) for k in names}
    return "tensor-scalar", t


def nested_tensor_item(depth: int) -> Any:
    item: Any = {"q8": {"scale": 1.0, "zero": 0, "codes": CBORTag(40, [[1], CBORTag(72, b"\x00")])}}
    for _ in range(depth):
        item = {"coo": {"shape": [1], "indices": CBORTag(40, [[1], CBORTag(79, b"\x00" * 8)]), "values": item}}
    return item
