"""Codec benchmark: encode+sign and verify+decode of float32 state dicts vs a plain copy.

Run by hand:  python bench/codec.py  [--quick]

For 10 KB, 1 MB and 16 MB state dicts, whole (one publish) and chunked at the
default 64 KiB, it times

* encode+sign   — `Sealer.seal` of an update body (tensors -> RFC 8746 CBOR, SHA-256,
                  one Ed25519 signature, COSE_Sign1 per chunk);
* verify+decode — `Inbox.receive` of every payload (parse, signature, replay and
                  chunk checks, reassembly, size and digest) + `messages.tensors_of`
                  (tensors out, NaN/Inf check);

and reports each as a ratio to two floors measured in the same run on a buffer of
the same size: a plain copy (`bytearray(b)`) and copy + SHA-256 (what any
hash-then-sign receiver must at least do). Best of N repetitions with
time.perf_counter. A table goes to stdout, then one last line of JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
from typing import Any, Callable

import torch

from fedmq.common import envelope, messages
from fedmq.common.channel import Inbox, Sealer
from fedmq.common.chunks import DEFAULT_CHUNK_SIZE
from fedmq.common.keys import Identity, KeyRing
from fedmq.common.tensors import encode_state_dict
from fedmq.common.topics import Topics

JOB = "bench"
NOW = 1_700_000_000.0
SIZES = {"10kb": 10 * 1024, "1mb": 1024 * 1024, "16mb": 16 * 1024 * 1024}
WHOLE = 1 << 40  # a chunk size no body reaches: one publish


def state_dict(nbytes: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of `nbytes` in total, shaped like a small MLP (weight + bias pairs)."""
    n = nbytes // 4
    g = torch.Generator().manual_seed(0)
    bias = min(256, n // 8)
    half = (n - 2 * bias) // 2
    return {"0.weight": torch.randn(half, generator=g), "0.bias": torch.randn(bias, generator=g),
            "1.weight": torch.randn(n - 2 * bias - half, generator=g), "1.bias": torch.randn(bias, generator=g)}


def best(fn: Callable[[], object], reps: int, inner: int = 1) -> float:
    """Best time of `reps` repetitions, each running `fn` `inner` times; seconds per call
    (garbage collection off while timing, as in timeit)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    finally:
        gc.enable()
    return min(times)


def breakdown(nbytes: int, reps: int) -> dict[str, float]:
    """Where verify+decode of one whole (unchunked) update spends its time, in ms."""
    slave = Identity.generate("slave-01")
    topic = Topics(JOB).slave("update", slave.name)
    sd = state_dict(nbytes)
    (payload,) = Sealer(slave, JOB, seq=1, chunk_size=WHOLE).seal(
        topic, messages.UPDATE, {"tensors": encode_state_dict(sd)}, now=NOW)
    env = envelope.parse(payload)
    manifest = envelope.verify_signature(env, slave.public_key, topic)
    body = envelope.loads(env.part)
    parts = {
        "parse COSE_Sign1 (cbor2 copies the body out)": lambda: envelope.parse(payload),
        "Ed25519 verify of the manifest": lambda: envelope.verify_signature(env, slave.public_key, topic),
        "size + SHA-256 of the body": lambda: envelope.check_body(manifest, env.part),
        "decode body CBOR (cbor2 copies tensor bytes)": lambda: envelope.loads(env.part),
        "tensors_of (zero-copy views + NaN/Inf check)": lambda: messages.tensors_of(body),
    }
    return {k: best(f, reps) * 1e3 for k, f in parts.items()}


def measure(label: str, nbytes: int, chunk_size: int, reps: int, inner: int) -> dict[str, float]:
    slave = Identity.generate("slave-01")
    ring = KeyRing()
    ring.add(slave.name, slave.public_key)
    topic = Topics(JOB).slave("update", slave.name)
    sd = state_dict(nbytes)
    sealer = Sealer(slave, JOB, seq=1, chunk_size=chunk_size)

    def body() -> dict:
        return {"update_id": "u", "kind": "delta", "base_version": 0, "samples": 1, "metrics": {},
                "tensors": encode_state_dict(sd)}

    def encode_sign() -> list[bytes]:
        return sealer.seal(topic, messages.UPDATE, body(), now=NOW)

    payloads = encode_sign()
    wire_bytes = sum(len(p) for p in payloads)
    # One fresh inbox per call (a replayed seq would be refused); built outside the timing.
    inboxes: list[Inbox] = []

    def verify_decode() -> dict[str, torch.Tensor]:
        inbox = inboxes.pop()
        got = None
        for p in payloads:
            got = inbox.receive(topic, p, NOW)
        return messages.tensors_of(got.body)

    inboxes.append(Inbox(ring, JOB))
    decoded = verify_decode()
    assert all(torch.equal(decoded[k], sd[k]) for k in sd)

    src = bytes(wire_bytes)  # same size as what travels
    view = memoryview(src)

    def copy() -> bytearray:
        return bytearray(view)

    def copy_sha() -> bytes:
        buf = bytearray(view)
        return hashlib.sha256(buf).digest()

    t_copy = best(copy, reps, inner)
    t_copy_sha = best(copy_sha, reps, inner)
    t_enc = best(encode_sign, reps, inner)
    inboxes.extend(Inbox(ring, JOB) for _ in range(reps * inner))
    t_dec = best(verify_decode, reps, inner)
    return {"label": label, "chunks": len(payloads), "wire_bytes": wire_bytes, "copy_s": t_copy,
            "copy_sha_s": t_copy_sha, "encode_sign_s": t_enc, "verify_decode_s": t_dec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier)")
    args = ap.parse_args()
    rows = []
    for name, nbytes in SIZES.items():
        reps, inner = {"10kb": (30, 50), "1mb": (30, 3), "16mb": (7, 1)}[name]
        if args.quick:
            reps = max(3, reps // 5)
        for chunked in (False, True):
            if chunked and nbytes <= DEFAULT_CHUNK_SIZE:
                continue  # fits one chunk: the same as the whole row
            r = measure(name, nbytes, DEFAULT_CHUNK_SIZE if chunked else WHOLE, reps, inner)
            r["chunked"] = chunked
            rows.append(r)

    us = lambda s: f"{s * 1e6:10.1f}"  # noqa: E731
    print("times in microseconds (best of N); ratios: encode+sign or verify+decode over copy, over copy+SHA-256")
    print(f"{'size':>5} {'publishes':>15} {'copy':>10} {'copy+sha':>10} {'enc+sign':>10} {'ver+dec':>10} "
          f"{'enc/copy':>8} {'dec/copy':>8} {'enc/c+sha':>9} {'dec/c+sha':>9} {'dec MB/s':>8}")
    figures: dict[str, Any] = {}
    for r in rows:
        enc_c, dec_c = r["encode_sign_s"] / r["copy_s"], r["verify_decode_s"] / r["copy_s"]
        enc_cs, dec_cs = r["encode_sign_s"] / r["copy_sha_s"], r["verify_decode_s"] / r["copy_sha_s"]
        mbps = r["wire_bytes"] / r["verify_decode_s"] / 1e6
        pubs = f"{r['chunks']} x 64 KiB" if r["chunked"] else "1 (whole)"
        print(f"{r['label']:>5} {pubs:>15} {us(r['copy_s'])} {us(r['copy_sha_s'])} {us(r['encode_sign_s'])} "
              f"{us(r['verify_decode_s'])} {enc_c:8.1f} {dec_c:8.1f} {enc_cs:9.2f} {dec_cs:9.2f} {mbps:8.0f}")
        key = r["label"] + ("_chunked" if r["chunked"] else "")
        figures.update({
            f"encode_sign_{key}_ms": round(r["encode_sign_s"] * 1e3, 4),
            f"verify_decode_{key}_ms": round(r["verify_decode_s"] * 1e3, 4),
            f"copy_{key}_ms": round(r["copy_s"] * 1e3, 4),
            f"copy_sha256_{key}_ms": round(r["copy_sha_s"] * 1e3, 4),
            f"encode_sign_{key}_ratio_to_copy": round(enc_c, 2),
            f"verify_decode_{key}_ratio_to_copy": round(dec_c, 2),
            f"encode_sign_{key}_ratio_to_copy_sha256": round(enc_cs, 2),
            f"verify_decode_{key}_ratio_to_copy_sha256": round(dec_cs, 2),
        })
    parts = breakdown(SIZES["1mb"], 10 if args.quick else 50)
    total = sum(parts.values())
    print(f"\nverify+decode of a whole 1 MB update, by step (best of N, ms; sum {total:.3f}):")
    for step, t in parts.items():
        print(f"  {t:7.3f}  {100 * t / total:4.0f} %  {step}")
    figures.update({"breakdown_1mb_ms": {k: round(v, 4) for k, v in parts.items()}})
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
