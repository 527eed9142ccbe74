"""Hostile MQTT payloads for bench/fuzz.py: mutated captures, CBOR and COSE games, signed hostile bodies.

Every generator returns a `Case`: the topic, the payloads to publish on it in order
(several for a chunked message), and what it is (`game`), so a finding names the
game that caused it. Three families:

* **unsigned**: random bytes and CBOR, and mutations of captured valid messages (bit
  flips, truncations, insertions, splices, CBOR-level and COSE-header games). The
  signature no longer verifies, or -- where only the unsigned COSE header changed --
  it does and the chunk logic sees the junk.
* **signed by an enrolled key** (`evil`, whose private key the fleet made): hostile
  manifests and bodies that pass the signature check and reach the schema, the
  tensor decoder, the round logic and the aggregation screen of the master.
* **signed by other keys**: an allowlisted key that never enrolls (`rogue`, the one
  that may be locked out by a sequence number far ahead), a key the allowlist does
  not hold (`outsider`), and forgeries of the master's messages (the slaves only
  trust the master's key, so those stop at the signature).

What the evil key may legitimately get accepted is tracked in `EvilLedger`, so the
invariant checker (bench/_fuzz_observer.py) can tell a hostile update that moved the
model from one whose influence stayed within the documented bounds.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import cbor2
import torch
from cbor2 import CBORTag

from fedmq.common.envelope import (ALG_EDDSA, COSE_SIGN1_TAG, HDR_ALG, HDR_BODY, HDR_CHUNK, HDR_KID, Manifest,
                                   protected_header, sig_structure)
from fedmq.common.keys import Identity, raw_public_bytes
from fedmq.common.tensors import encode_quantized, encode_sparse, encode_state_dict, encode_tensor
from fedmq.common.topics import Topics, chunk_topic

EVIL_SAMPLES = 40  # what the evil key declares when it enrolls (the cap of its weight)
MAX_PAYLOAD = 1_900_000  # under Mosquitto's max_packet_size (2 MiB) with the topic and headers


@dataclass
class Case:
    game: str
    topic: str
    payloads: list[bytes]
    retain: bool = False
    qos: int = 1
    notes: list[tuple[str, EvilUpdate]] = field(default_factory=list)  # evil updates it carries, by update_id

    def publishes(self) -> list[tuple[str, bytes]]:
        return [(self.topic, p) for p in self.payloads]


@dataclass
class LiveState:
    """What the fuzzer knows of the job right now (from the observer's verified view)."""

    round: int = 0
    version: int = 0
    participants: tuple[str, ...] = ()
    run: str = ""


@dataclass
class EvilUpdate:
    """An update the evil key sent that the master may accept (bounded influence), or
    must refuse; `seed` regenerates its tensors (`Roles.evil_tensors`; 0: tensors of
    another kind, not reproducible)."""

    game: str
    sender: str
    claimed: int
    seed: int
    admissible: bool  # true: accepted with capped weight is the documented behaviour


@dataclass
class EvilLedger:
    """Every update the evil key published, by update_id: several may share one id (only
    the first the master accepts can count; later ones are duplicates)."""

    updates: dict[str, list[EvilUpdate]] = field(default_factory=dict)

    def note(self, uid: str, upd: EvilUpdate) -> None:
        self.updates.setdefault(uid, []).append(upd)


# ---------------------------------------------------------------- raw CBOR


def head(major: int, n: int, width: int | None = None) -> bytes:
    """A CBOR item head; `width` forces a non-minimal length encoding (1, 2, 4 or 8 bytes)."""
    if width is None:
        width = 0 if n < 24 else 1 if n < 256 else 2 if n < 65536 else 4 if n < 2**32 else 8
    if width == 0:
        return bytes([major << 5 | n])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | ai]) + n.to_bytes(width, "big")


def raw_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A CBOR map from pairs, duplicates allowed (cbor2 cannot write those)."""
    return head(5, len(pairs)) + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in pairs)


def cose(protected: bytes, unprotected: Any, payload: bytes, signature: bytes, tag: int = COSE_SIGN1_TAG) -> bytes:
    return cbor2.dumps(CBORTag(tag, [protected, unprotected, payload, signature]))


def nested(depth: int, leaf: bytes = b"\x00", container: bytes = b"\x81") -> bytes:
    return container * depth + leaf


def cbor_bombs(rng: random.Random) -> bytes:
    """Short inputs that claim a lot or nest deep."""
    choices: list[Callable[[], bytes]] = [
        lambda: head(2, 2**63 - 1, 8) + b"xx",  # byte string claiming 8 EiB
        lambda: head(3, 2**32, 8) + b"ab",
        lambda: head(4, 2**40, 8) + b"\x00",  # array claiming 2^40 items
        lambda: head(5, 2**31, 4) + b"\x00\x00",
        lambda: nested(rng.choice([17, 100, 1000, 20000])),  # deep definite arrays
        lambda: nested(rng.choice([17, 100, 5000]), container=b"\x9f") + b"\xff" * 3,  # indefinite arrays
        lambda: nested(rng.choice([50, 3000]), container=b"\xa1\x00"),  # maps of maps
        lambda: nested(rng.choice([50, 3000]), container=b"\xd8\x28"),  # tag 40 in tag 40 ...
        lambda: b"\x5f" + b"\x41a" * rng.randint(1, 5000) + b"\xff",  # indefinite byte string, many pieces
        lambda: b"\x5f\x61a\xff",  # indefinite bytes with a text piece
        lambda: b"\xc2" + head(2, 4096) + bytes([0xff]) * 4096,  # bignum of 32 kbit
        lambda: b"\xd8\x24" + cbor2.dumps("Content-Type: multipart/mixed; boundary=x\n\n" + "--x\n" * 200),  # MIME
        lambda: b"\xd8\x1c" + b"\x81" + b"\xd8\x1d\x00",  # shared reference to itself
        lambda: b"\xd9\x01\x02" + cbor2.dumps([1, 1, 1]),  # set with duplicates
        lambda: b"\xd9\xd9\xf7" * 50 + b"\x00",  # self-describe tags
        lambda: b"\xf8\x10",  # simple value 16
        lambda: b"\xf7" + b"\x00",  # undefined then trailing bytes
        lambda: b"\xfb" + struct.pack(">d", math.nan),
        lambda: b"\x1b" + (2**64 - 1).to_bytes(8, "big"),
        lambda: bytes([0x1c]),  # reserved additional info
        lambda: b"\xa2\x01\x02\x01\x03",  # duplicate keys
        lambda: b"\xd2\x84" + b"\x40" * 3 + head(2, 2**62, 8),  # COSE_Sign1 whose signature claims 4 EiB
    ]
    return rng.choice(choices)()


def random_cbor(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 7)
    if kind == 0:
        return rng.choice([0, -1, 1, 23, 24, 255, 2**31, -(2**63), 2**64 - 1])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 1e308, 5e-324])
    if kind == 2:
        return rng.randbytes(rng.choice([0, 1, 8, 16, 32, 64, 300]))
    if kind == 3:
        return rng.choice(["", "a", "\x00", "\u202e", "x" * 300, "update", "model", "master", "slave-00"])
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return CBORTag(rng.choice([18, 24, 40, 64, 72, 85, 98, 1234]), rng.randbytes(8))
    if kind == 6:
        return CBORTag(40, [[rng.randint(0, 9)], CBORTag(85, rng.randbytes(rng.choice([0, 4, 8])))])
    if kind in (7, 8):
        return [random_cbor(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind in (9, 10):
        return {random_key(rng): random_cbor(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return CBORTag(rng.choice([0, 1, 2, 3, 4, 5, 18, 25, 28, 29, 30, 35, 36, 37, 40, 258, 55799]), random_cbor(rng, depth + 1))


def random_key(rng: random.Random) -> Any:
    """A map key: text as fedmq uses, or the scalars a hostile sender might use instead."""
    if rng.random() < 0.7:
        return rng.choice(["v", "kind", "job", "tensors", "x", "update_id", "samples", 1, -65537, -65538])
    return rng.choice([1.0, -65537.0, True, None, b"k", -1, 2**64 - 1, math.nan, "", "\x00", CBORTag(2, b"\x01")])


def safe_dumps(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:  # noqa: BLE001 - some random values (e.g. odd tags) do not encode
        return b"\xf6"


# ---------------------------------------------------------------- byte mutations


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> tuple[str, bytes]:
    b = bytearray(data)
    op = rng.randrange(9)
    if not b:
        return "empty+junk", rng.randbytes(rng.randint(1, 64))
    if op == 0:
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return "bitflip", bytes(b)
    if op == 1:
        for _ in range(rng.choice([1, 2, 8])):
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xff, 0x7f, 0x80, 0x1b, 0x5b, 0x9f, 0xbf, 0xd8])
        return "byteset", bytes(b)
    if op == 2:
        return "truncate", bytes(b[: rng.randrange(len(b))])
    if op == 3:
        i = rng.randrange(len(b) + 1)
        return "insert", bytes(b[:i] + rng.randbytes(rng.choice([1, 2, 9, 100])) + b[i:])
    if op == 4:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.choice([1, 4, 64, 4096]))
        return "delete", bytes(b[:i] + b[j:])
    if op == 5:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.choice([1, 16, 256]))
        return "duplicate-range", bytes(b[:j] + b[i:j] + b[j:])
    if op == 6:
        other = rng.choice(others) if others else rng.randbytes(64)
        i, j = rng.randrange(len(b)), rng.randrange(len(other) + 1)
        return "splice", bytes(b[:i] + other[j:])
    if op == 7:
        return "trailing-junk", bytes(b) + rng.choice([b"\x00", b"\xff", cbor2.dumps({"x": 1}), rng.randbytes(32)])
    # an integer head rewritten somewhere: lengths become huge
    i = rng.randrange(len(b))
    return "length-bomb", bytes(b[:i] + bytes([b[i] & 0xe0 | 27]) + (2**62).to_bytes(8, "big") + b[i + 1:])


# ---------------------------------------------------------------- COSE-level mutations of a captured message


def split_cose(data: bytes) -> tuple[bytes, dict, bytes, bytes] | None:
    try:
        obj = cbor2.loads(data)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(obj, CBORTag) or obj.tag != COSE_SIGN1_TAG or len(obj.value) != 4:
        return None
    prot, unprot, payload, sig = obj.value
    return prot, dict(unprot), payload, sig


MANIFEST_KEYS = ("v", "kind", "job", "sender", "topic", "seq", "ts", "version", "round", "size", "sha256", "chunks")


def manifest_variants(rng: random.Random, m: dict[str, Any], kids: list[bytes]) -> tuple[str, bytes]:
    """A captured manifest changed at the CBOR level (the signature no longer covers it,
    but `Manifest.decode` runs before the signature check)."""
    m = dict(m)
    key = rng.choice(MANIFEST_KEYS)
    op = rng.randrange(10)
    if op == 0:
        other = rng.choice(MANIFEST_KEYS)
        m[key], m[other] = m.get(other), m.get(key)
        return f"manifest-swap:{key}/{other}", cbor2.dumps(m)
    if op == 1:
        v = m.get(key)
        m[key] = float(v) if isinstance(v, int) else 1.0
        return f"manifest-float:{key}", cbor2.dumps(m)
    if op == 2:
        m[key] = rng.choice([2**64 - 1, -(2**64), 2**63, -1, CBORTag(2, b"\xff" * 600)])
        return f"manifest-huge:{key}", safe_dumps(m)
    if op == 3:
        pairs = list(m.items()) + [(key, rng.choice([0, "x", b"", 2**40]))]
        return f"manifest-dupkey:{key}", raw_map(pairs)
    if op == 4:
        m.pop(key, None)
        return f"manifest-missing:{key}", cbor2.dumps(m)
    if op == 5:
        m[rng.choice(["extra", 1, -1, 1.0, b"k"])] = 0
        return "manifest-extra", safe_dumps(m)
    if op == 6:
        m[key] = random_cbor(rng)
        return f"manifest-random:{key}", safe_dumps(m)
    if op == 7:
        return "manifest-deep", cbor2.dumps(m)[:-1] + nested(rng.choice([16, 200]))
    if op == 8:
        m["v"] = rng.choice([1.0, True, 2, 0, "1"])
        return "manifest-version", cbor2.dumps(m)
    return "manifest-notamap", rng.choice([cbor2.dumps(list(m.values())), b"\x00", b"", nested(30)])


def cose_variants(rng: random.Random, data: bytes, kids: list[bytes], bodies: list[bytes]) -> tuple[str, bytes]:
    parts = split_cose(data)
    if parts is None:
        return mutate_bytes(rng, data, bodies)
    prot, unprot, payload, sig = parts
    op = rng.randrange(14)
    if op == 0:  # header games in the protected header
        alg = rng.choice([-8.0, -7, "EdDSA", None, 2**64 - 1, CBORTag(2, b"\x01"), True])
        return f"alg:{alg!r}"[:40], cose(safe_dumps({HDR_ALG: alg, HDR_KID: rng.choice(kids)}), unprot, payload, sig)
    if op == 1:  # kid of another key, valid otherwise
        return "kid-other", cose(protected_header(rng.choice(kids)), unprot, payload, sig)
    if op == 2:
        kid = rng.choice([b"", b"\x00" * 15, b"\x00" * 17, "kid", 7, None])
        return "kid-shape", cose(safe_dumps({HDR_ALG: ALG_EDDSA, HDR_KID: kid}), unprot, payload, sig)
    if op == 3:
        return "protected-dupkey", cose(raw_map([(HDR_ALG, ALG_EDDSA), (HDR_KID, rng.choice(kids)), (HDR_ALG, -7)]),
                                        unprot, payload, sig)
    if op == 4:  # the unprotected header is not signed: these pass the signature check
        index, count = rng.choice([(0, 1), (1, 1), (5, 3), (-1, 2), (0, 2**64 - 1), (2**40, 2**41), (0, 2), (1, 2),
                                   (0.0, 2), (True, 2), (0, 16385)])
        u = dict(unprot)
        u[HDR_CHUNK] = [index, count]
        return f"chunk-header:{index}/{count}"[:40], cose(prot, u, payload, sig)
    if op == 5:
        u = dict(unprot)
        u[HDR_CHUNK] = rng.choice([[0], [0, 2, 3], "0/2", {0: 2}, None, [None, None], [-0.0, 1.5]])
        return "chunk-header-shape", cose(prot, u, payload, sig)
    if op == 6:
        u = dict(unprot)
        u[HDR_BODY] = rng.choice(bodies) if bodies and rng.random() < 0.5 else rng.choice(
            [b"", b"\xa0", rng.randbytes(64), "text", 0, None, [b"a"]])
        return "body-swap", cose(prot, u, payload, sig)
    if op == 7:
        u = {float(HDR_BODY): unprot.get(HDR_BODY, b"")} if rng.random() < 0.5 else {}
        return "body-label", cose(prot, u, payload, sig)
    if op == 8:
        m = _loads_or_none(payload)
        if isinstance(m, dict):
            game, new = manifest_variants(rng, m, kids)
            return game, cose(prot, unprot, new, sig)
        return "manifest-bytes", cose(prot, unprot, rng.randbytes(40), sig)
    if op == 9:
        s = bytearray(sig)
        s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
        return "signature-flip", cose(prot, unprot, payload, rng.choice([bytes(s), b"\x00" * 64, sig[:63], sig + b"\x00"]))
    if op == 10:
        tag = rng.choice([98, 17, 19, 0, 40, 55799])
        return f"cose-tag:{tag}", cose(prot, unprot, payload, sig, tag=tag)
    if op == 11:
        items = rng.choice([[prot, unprot, payload], [prot, unprot, payload, sig, b""], [unprot, prot, payload, sig],
                            [prot, list(unprot.items()), payload, sig]])
        return "cose-array", safe_dumps(CBORTag(COSE_SIGN1_TAG, items))
    if op == 12:
        return "cose-untagged", cbor2.dumps([prot, unprot, payload, sig])
    u = dict(unprot)  # unprotected header full of junk, body kept
    for _ in range(rng.randint(1, 20)):
        u[rng.choice([1, 4, 33, -65539, "x", 2**63])] = random_cbor(rng)
    return "unprotected-junk", safe_dumps(CBORTag(COSE_SIGN1_TAG, [prot, u, payload, sig]))


def _loads_or_none(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- signing hostile messages


class Signer:
    """Signs anything for one identity: valid manifests (`seal`) or hand-made ones (`raw`).

    Its own sequence counter only grows, like a real sender's, so a hostile body still
    passes the replay check; `seq` overrides it for the sequence-number games."""

    def __init__(self, identity: Identity, job: str, seq: int) -> None:
        self.identity = identity
        self.job = job
        self.next_seq = seq

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def seal(self, signed_topic: str, kind: str, body: Any, *, version: int = 0, round: int = 0,
             raw: bytes | None = None, chunk_size: int = 1 << 30, now_ms: int = 0, **overrides: Any) -> list[bytes]:
        """Sign `body` (or `raw` CBOR bytes) as `kind` for `signed_topic` (the external_aad);
        manifest fields in `overrides` replace the computed ones (sender, job, seq, size,
        sha256, chunks, and the manifest's own `topic`)."""
        data = raw if raw is not None else cbor2.dumps(body)
        parts = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
        fields = dict(kind=kind, job=self.job, sender=self.identity.name, topic=signed_topic, seq=None, ts=now_ms,
                      version=version, round=round, size=len(data), sha256=hashlib.sha256(data).digest(),
                      chunks=len(parts))
        fields.update(overrides)
        if fields["seq"] is None:
            fields["seq"] = self.take_seq()
        manifest = Manifest(**fields)
        return self.sign_payload(signed_topic, manifest.encode(), parts, chunked=fields["chunks"] > 1 or len(parts) > 1)

    def sign_payload(self, topic: str, payload: bytes, parts: list[bytes], *, chunked: bool,
                     chunk_headers: list[Any] | None = None, kid: bytes | None = None) -> list[bytes]:
        protected = protected_header(kid or self.identity.kid)
        signature = self.identity.private_key.sign(sig_structure(protected, topic, payload))
        out = []
        for i, part in enumerate(parts):
            unprotected: dict[int, Any] = {HDR_BODY: part}
            if chunk_headers is not None:
                unprotected[HDR_CHUNK] = chunk_headers[i]
            elif chunked:
                unprotected[HDR_CHUNK] = [i, len(parts)]
            out.append(cose(protected, unprotected, payload, signature))
        return out


def new_signer(identity: Identity, job: str, now: float) -> Signer:
    return Signer(identity, job, int(now * 1_000_000))


# ---------------------------------------------------------------- hostile tensors


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


# ---------------------------------------------------------------- the case factory


class Roles:
    """The keys and names the fuzzer plays with, and the model's tensor names and shapes."""

    def __init__(self, topics: Topics, *, honest: list[str], evil: Identity, rogue: Identity, outsider: Identity,
                 kids: dict[str, bytes], spec: dict[str, tuple[int, ...]], now: float) -> None:
        self.topics = topics
        self.honest = honest
        self.evil, self.rogue, self.outsider = (new_signer(i, topics.job, now) for i in (evil, rogue, outsider))
        self.kids = kids  # every known key id by name (master, slaves), to put in headers
        self.spec = spec

    def evil_tensors(self, seed: int) -> dict[str, torch.Tensor]:
        """The tensors of an evil update that could pass every check: finite, the model's
        shapes, norm ~2 (under the default bound of 10). Each seed is a direction of its
        own, so the witness can tell which of several such updates made a version."""
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=g) * 0.02 for n, s in self.spec.items()}


class CaseFactory:
    """Draws the next hostile message; `captured` holds valid payloads per topic."""

    def __init__(self, rng: random.Random, roles: Roles, captured: dict[str, list[bytes]], live: LiveState) -> None:
        self.rng = rng
        self.roles = roles
        self.captured = {t: list(p) for t, p in captured.items() if p}
        self.all_captured = [p for ps in self.captured.values() for p in ps]
        self.live = live
        self._notes: list[tuple[str, EvilUpdate]] = []
        self._seeds = 1000  # evil tensors' seeds, one per update
        t = roles.topics
        self.master_targets = [t.slave(n, s) for n in ("confirm", "update", "presence")
                               for s in [*roles.honest, roles.evil.identity.name, roles.rogue.identity.name,
                                         roles.outsider.identity.name, "nobody"]]
        self.slave_targets = [t.master("instruction"), t.master("model"), t.master("round"), t.master("delta")] + \
            [t.direct(s) for s in [*roles.honest, roles.evil.identity.name]] + \
            [chunk_topic(t.master(n), i) for n in ("instruction", "model", "round") for i in (0, 1, 7)]
        self.games: list[tuple[float, Callable[[], Case]]] = [
            (6, self.random_bytes), (4, self.random_cbor_item), (4, self.bomb), (12, self.mutated_capture),
            (10, self.cose_game), (4, self.replay), (3, self.wrong_topic_replay), (2, self.retained_junk),
            (20, self.evil_update), (4, self.evil_manifest), (4, self.evil_chunks), (3, self.evil_confirm),
            (2, self.evil_presence), (3, self.evil_kind_games), (2, self.rogue_games), (3, self.outsider_games),
            (5, self.forged_master),
        ]
        self._weights = [w for w, _ in self.games]

    def next(self) -> Case:
        self._notes = []
        _, make = self.rng.choices(self.games, weights=self._weights)[0]
        case = make()
        case.notes = self._notes
        if max((len(p) for p in case.payloads), default=0) > MAX_PAYLOAD:  # the broker would drop the fuzzer
            case.payloads = [p[:MAX_PAYLOAD] for p in case.payloads]
            case.game += "(cut)"
        return case

    # -- unsigned ------------------------------------------------------------------

    def any_target(self) -> str:
        return self.rng.choice(self.master_targets if self.rng.random() < 0.5 else self.slave_targets)

    def random_bytes(self) -> Case:
        n = int(self.rng.choice([0, 1, 2, 5, 17, 64, 300, 4096, 70_000]))
        return Case("random-bytes", self.any_target(), [self.rng.randbytes(n)], qos=self.rng.choice([0, 1]))

    def random_cbor_item(self) -> Case:
        value = random_cbor(self.rng)
        if self.rng.random() < 0.5:
            value = CBORTag(COSE_SIGN1_TAG, [safe_dumps(random_cbor(self.rng)), {HDR_BODY: safe_dumps(value)},
                                             safe_dumps(random_cbor(self.rng)), self.rng.randbytes(64)])
        return Case("random-cbor", self.any_target(), [safe_dumps(value)])

    def bomb(self) -> Case:
        data = cbor_bombs(self.rng)
        if self.rng.random() < 0.5:  # inside an otherwise plausible envelope, as the body or the manifest
            cap = self._capture_for(self.any_target())
            parts = split_cose(cap[1]) if cap else None
            if parts:
                prot, unprot, payload, sig = parts
                if self.rng.random() < 0.5:
                    unprot[HDR_BODY] = data
                    return Case("bomb-in-body", cap[0], [cose(prot, unprot, payload, sig)])
                return Case("bomb-in-manifest", cap[0], [cose(prot, unprot, data, sig)])
        return Case("bomb", self.any_target(), [data])

    def _capture_for(self, topic: str) -> tuple[str, bytes] | None:
        """A captured payload of this topic's kind (any, if none), and the topic it was on."""
        base = topic.split("/chunk/")[0]
        if self.captured.get(base):
            return base, self.rng.choice(self.captured[base])
        if not self.captured:
            return None
        t = self.rng.choice(list(self.captured))
        return t, self.rng.choice(self.captured[t])

    def mutated_capture(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        game, data = mutate_bytes(self.rng, cap[1], self.all_captured)
        return Case(game, cap[0], [data], qos=self.rng.choice([0, 1, 1]))

    def cose_game(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        game, data = cose_variants(self.rng, cap[1], list(self.roles.kids.values()), self.all_captured)
        return Case(game, cap[0], [data])

    def replay(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        return Case("replay", cap[0], [cap[1]], retain=self.rng.random() < 0.2, qos=self.rng.choice([0, 1]))

    def wrong_topic_replay(self) -> Case:
        cap = self._capture_for(self.any_target())
        if cap is None:
            return self.random_bytes()
        return Case("replay-other-topic", self.any_target(), [cap[1]])

    def retained_junk(self) -> Case:
        """Retained junk where slaves bootstrap from: the instruction, model and round topics."""
        t = self.roles.topics
        topic = self.rng.choice([t.master("instruction"), t.master("model"), t.master("round"),
                                 chunk_topic(t.master("model"), 0)])
        cap = self._capture_for(topic)
        data = self.rng.choice([b"", b"\x00", cbor_bombs(self.rng),
                                mutate_bytes(self.rng, cap[1], self.all_captured)[1] if cap else b"\xa0"])
        return Case("retained-junk", topic, [data], retain=True)

    # -- signed by the enrolled evil key ---------------------------------------------

    def _evil_uid(self, r: int | None = None, v: int | None = None) -> str:
        """The id the master expects of the evil key: SENDER/ROUND/VERSION (of the open round)."""
        return f"{self.roles.evil.identity.name}/{self.live.round if r is None else r}/" \
               f"{self.live.version if v is None else v}"

    def _seed(self) -> int:
        self._seeds += 1
        return self._seeds

    def _note(self, uid: Any, game: str, *, seed: int = 0, claimed: int = EVIL_SAMPLES,
              admissible: bool = False) -> None:
        """Remember what the evil key sends under `uid` (written to the ledger once it is published)."""
        if isinstance(uid, str):
            self._notes.append((uid, EvilUpdate(game, self.roles.evil.identity.name, claimed, seed, admissible)))

    def _update_body(self, uid: Any, tensors: dict[str, Any], *, samples: Any = EVIL_SAMPLES, kind: Any = "delta",
                     base: Any = None, metrics: Any = None) -> dict[str, Any]:
        return {"update_id": uid, "kind": kind, "base_version": self.live.version if base is None else base,
                "samples": samples, "metrics": {"train_loss": 0.5, "bytes_in": 1000} if metrics is None else metrics,
                "tensors": tensors}

    def evil_update(self) -> Case:
        """A validly signed update for the open round whose body breaks one rule (or, for
        `samples-huge` and `metrics-junk`, stretches what the protocol tolerates)."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        r, v = live.round, live.version
        uid = self._evil_uid()
        seed = self._seed()
        valid = encode_state_dict(self.roles.evil_tensors(seed))
        op = rng.randrange(14)
        manifest = {"version": v, "round": r}
        if op < 5:
            game, tensors = hostile_tensors(rng, self.roles.spec)
            body = self._update_body(uid, tensors)
            self._note(uid, game)
        elif op == 5:  # the documented bound: weight capped to what the slave declared
            claimed = rng.choice([EVIL_SAMPLES + 1, 10**6, 2**40, 2**63 - 1, 2**64 - 1])
            game, body = "samples-huge", self._update_body(uid, valid, samples=claimed)
            self._note(uid, game, seed=seed, claimed=claimed, admissible=True)
        elif op == 6:
            samples = rng.choice([0, -1, 1.5, True, "40", None, [40], CBORTag(2, b"\x01" * 20), math.nan])
            game, body = "samples-bad", self._update_body(uid, valid, samples=samples)
            self._note(uid, game, seed=seed)
        elif op == 7:  # metrics are informational: junk there may be accepted, with the capped weight
            metrics = rng.choice([{"bytes_in": rng.choice([2**64 - 1, -1, -(2**63), 2**62])},
                                  {"bytes_in": math.nan}, {"bytes_in": "x"}, {"x" * 1000: 1.0},
                                  {str(i): float(i) for i in range(rng.choice([100, 20000]))},
                                  _deep_map(rng.choice([5, 14])), [], "m"])
            game = "metrics-junk"
            body = self._update_body(uid, valid, metrics=metrics)
            self._note(uid, game, seed=seed, admissible=isinstance(metrics, dict))
        elif op == 8:  # another slave's update id: an update belongs to its signer
            uid = f"{rng.choice(self.roles.honest)}/{r}/{v}"
            game, body = "uid-of-other-slave", self._update_body(uid, valid)
            self._note(uid, game, seed=seed)
        elif op == 9:  # not exactly SENDER/ROUND/VERSION
            bad_uid = rng.choice([7, b"id", None, "", "x" * rng.choice([1000, 500_000]), "\u202e\x00", ["a"],
                                  uid + "#2", uid + " ", uid + "\x00", uid.upper(), f"{name}/{r + 1}/{v}",
                                  f"{name}/{r}/{v + 1}", f"{name}/{r}/{v}/0", f"{name}//{r}/{v}", f"./{uid}"])
            game, body = "uid-bad", self._update_body(bad_uid, valid)
            self._note(bad_uid, game, seed=seed)
        elif op == 10:
            kind = rng.choice(["foo", "", "DELTA", 1, None, "model", "gradient ", ["delta"]])
            game, body = "update-kind", self._update_body(uid, valid, kind=kind)
            self._note(uid, game, seed=seed)
        elif op == 11:  # base version other than the open round's, its id consistent with it
            base = rng.choice([v - 1, v + 1, v + 10**6, 2**64 - 1, -1, float(v), True])
            game, body = "base-version", self._update_body(f"{name}/{r}/{base}", valid, base=base)
            self._note(body["update_id"], game, seed=seed)
            if isinstance(base, int) and not isinstance(base, bool) and base >= 0 and rng.random() < 0.7:
                manifest["version"] = base
        elif op == 12:  # a round that is not open, its id consistent with it
            rr = max(0, rng.choice([r - 1, r + 1, r + 1000, 0]))
            game, body = "round-not-open", self._update_body(self._evil_uid(rr, v), valid)
            self._note(body["update_id"], game, seed=seed)
            manifest["round"] = rr
        else:  # the body's fields swapped around, or missing
            body = self._update_body(uid, valid)
            k1, k2 = rng.sample(sorted(body), 2)
            if rng.random() < 0.5:
                body[k1], body[k2] = body[k2], body[k1]
            else:
                del body[k1]
            game = f"update-fields:{k1}/{k2}"
            self._note(body.get("update_id"), game, seed=seed)
        return Case(game, topic, evil.seal(topic, "update", body, **manifest))

    def preempt(self) -> Case:
        """Right after a round opens: an honest slave's update id for it, from the evil key,
        before that slave can send its own (an update belongs to its signer)."""
        self._notes = []
        live, evil = self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = f"{self.rng.choice(self.roles.honest)}/{live.round}/{live.version}"
        seed = self._seed()
        body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
        self._note(uid, "preempt-uid", seed=seed)
        case = Case("preempt-uid", topic, evil.seal(topic, "update", body, version=live.version, round=live.round))
        case.notes = self._notes
        return case

    def evil_manifest(self) -> Case:
        """Valid signature and body, hostile manifest: other job, sender, topic, seq, sizes.
        A manifest topic other than the one signed for and the timestamp are informational
        (the signature binds the real topic): those updates may count, like an honest one."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = self._evil_uid()
        seed = self._seed()
        body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
        raw = cbor2.dumps(body)
        op = rng.randrange(9)
        kw: dict[str, Any] = {"version": live.version, "round": live.round}
        if op == 0:
            game, kw["job"] = "manifest-job", rng.choice(["other", "digits2", "x" * 64])
        elif op == 1:
            game, kw["sender"] = "manifest-sender", rng.choice(self.roles.honest + ["master"])
        elif op == 2:
            game, kw["topic"] = "manifest-topic", self.roles.topics.slave("update", rng.choice(self.roles.honest))
        elif op == 3:  # a sequence number from the past: a replay
            game, kw["seq"] = "seq-behind", rng.choice([0, 1, evil.next_seq - 10**6])
        elif op == 4:  # further ahead than a day: refused without locking the key out
            game, kw["seq"] = "seq-ahead-2d", evil.next_seq + 2 * 86_400 * 10**6
        elif op == 5:
            game, kw["size"] = "manifest-size", rng.choice([len(raw) + 1, len(raw) - 1, 0, 2**62])
        elif op == 6:
            game, kw["sha256"] = "manifest-digest", hashlib.sha256(raw + b"x").digest()
        elif op == 7:
            game, kw["version"], kw["round"] = "manifest-version-round", rng.choice([10**9, 2**63]), rng.choice([10**9, 2**63])
        else:
            game, kw["ts"] = "manifest-ts", rng.choice([0, 2**63])
        self._note(uid, game, seed=seed, admissible=game in ("manifest-topic", "manifest-ts"))
        return Case(game, topic, evil.seal(topic, "update", None, raw=raw, **kw))

    def evil_chunks(self) -> Case:
        """Chunk games with a valid signature: missing, duplicated, reordered, forged and endless chunks."""
        rng, live, evil = self.rng, self.live, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("update", name)
        uid = self._evil_uid()
        game, tensors = hostile_tensors(rng, self.roles.spec)
        self._note(uid, "chunks:" + game)
        raw = cbor2.dumps(self._update_body(uid, tensors))
        size = rng.choice([1024, 4096, 16384])
        parts = [raw[i:i + size] for i in range(0, len(raw), size)]
        op = rng.randrange(7)
        seq = evil.take_seq()
        kw = dict(kind="update", job=evil.job, sender=name, topic=topic, seq=seq, ts=0, version=live.version,
                  round=live.round, size=len(raw), sha256=hashlib.sha256(raw).digest(), chunks=len(parts))
        if op == 0:  # one chunk never comes: held until the reassembly timeout
            keep = list(range(len(parts)))
            keep.pop(rng.randrange(len(keep)))
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            return Case("chunks-missing:" + game, topic, [payloads[i] for i in keep])
        if op == 1:
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            out = payloads + [rng.choice(payloads) for _ in range(3)]
            rng.shuffle(out)
            return Case("chunks-dup-shuffled:" + game, topic, out)
        if op == 2:  # forged slices under the same signed header (digest fails)
            payloads = evil.sign_payload(topic, Manifest(**kw).encode(), parts, chunked=True)
            forged = evil.sign_payload(topic, Manifest(**kw).encode(), [rng.randbytes(len(p)) for p in parts], chunked=True)
            return Case("chunks-forged-slices", topic, [x for pair in zip(forged, payloads) for x in pair])
        if op == 3:  # endless: a huge claimed count and size, tiny chunks
            kw.update(chunks=16384, size=16384 * 64)
            payload = Manifest(**kw).encode()
            n = rng.choice([20, 200])
            return Case("chunks-endless", topic, evil.sign_payload(
                topic, payload, [rng.randbytes(64) for _ in range(n)], chunked=True,
                chunk_headers=[[i, 16384] for i in range(n)]))
        if op == 4:  # chunk headers that disagree with the signed count
            payload = Manifest(**kw).encode()
            headers = [[i, len(parts) + rng.choice([1, -1, 1000])] for i in range(len(parts))]
            return Case("chunks-count-mismatch", topic, evil.sign_payload(topic, payload, parts, chunked=True,
                                                                         chunk_headers=headers))
        if op == 5:  # large claimed size, within the per-sender budget: pins memory until the timeout
            kw.update(size=rng.choice([8, 60]) * 1024 * 1024, chunks=rng.choice([128, 1024]))
            payload = Manifest(**kw).encode()
            n = 8
            return Case("chunks-big-claim", topic, evil.sign_payload(
                topic, payload, [rng.randbytes(65536) for _ in range(n)], chunked=True,
                chunk_headers=[[i, kw["chunks"]] for i in range(n)]))
        kw["chunks"] = 1  # signed as one chunk, sent as several
        payload = Manifest(**kw).encode()
        return Case("chunks-unsigned-split", topic, evil.sign_payload(topic, payload, parts, chunked=True))

    def evil_confirm(self) -> Case:
        """Confirm/decline bodies; never one that would enroll the evil key with other samples."""
        rng, evil = self.rng, self.roles.evil
        name = evil.identity.name
        topic = self.roles.topics.slave("confirm", name)
        pub = _raw_public(evil.identity)
        op = rng.randrange(6)
        if op == 0:
            body = {"public_key": pub, "samples": rng.choice([0, -1, 1.5, "40", None, True, CBORTag(2, b"\x01" * 9)]),
                    "capabilities": {}}
            game = "confirm-samples"
        elif op == 1:
            body = {"public_key": rng.choice([b"", b"\x00" * 32, pub[:31], "key", _raw_public(self.roles.rogue.identity)]),
                    "samples": EVIL_SAMPLES, "capabilities": {}}
            game = "confirm-public-key"
        elif op == 2:
            body = {"public_key": pub, "samples": EVIL_SAMPLES,
                    "capabilities": rng.choice([_deep_map(14), {"x" * 100_000: 1}, {"update": ["delta"] * 50_000}, []])}
            game = "confirm-capabilities"
        elif op == 3:  # a decline with an oversized reason: the master's status must stay publishable
            body = {"public_key": pub, "reason": "r" * rng.choice([10, 100_000, 1_500_000, 3_000_000])}
            return Case("decline-long-reason", topic, evil.seal(topic, "decline", body, chunk_size=65536))
        elif op == 4:
            body = {"public_key": pub, "reason": rng.choice([None, 5, b"x", ["a"]])}
            return Case("decline-bad", topic, evil.seal(topic, "decline", body))
        else:
            body = random_cbor(rng)
            game = "confirm-random"
        return Case(game, topic, evil.seal(topic, "confirm", body))

    def evil_presence(self) -> Case:
        rng, evil = self.rng, self.roles.evil
        topic = self.roles.topics.slave("presence", evil.identity.name)
        body = rng.choice([{"state": "dancing", "version": 0}, {"state": "online", "version": 2**64 - 1},
                           {"state": "online", "version": 1.5}, {"state": None}, {"state": "online", "version": -10**30},
                           {"state": "offline", "version": 0}])
        return Case("presence", topic, evil.seal(topic, "presence", body), retain=rng.random() < 0.5)

    def evil_kind_games(self) -> Case:
        """Kinds on topics they do not belong to, other slaves' topics, and master topics."""
        rng, evil, t = self.rng, self.roles.evil, self.roles.topics
        name = evil.identity.name
        op = rng.randrange(5)
        if op == 0:
            topic = t.slave("update", name)
            kind = rng.choice(["model", "instruction", "round", "presence", "confirm", "reconfirm", "", "x" * 300])
            return Case(f"kind-on-update:{kind[:12]}", topic, evil.seal(topic, kind, {"run": "x", "tensors": {}}))
        if op == 1:  # signed for and sent to another slave's topic
            topic = t.slave(rng.choice(["update", "confirm", "presence"]), rng.choice(self.roles.honest))
            uid = f"{rng.choice(self.roles.honest)}/{self.live.round}/{self.live.version}"
            seed = self._seed()
            body = self._update_body(uid, encode_state_dict(self.roles.evil_tensors(seed)))
            self._note(uid, "other-slave-topic", seed=seed)
            return Case("other-slave-topic", topic, evil.seal(topic, "update", body, version=self.live.version,
                                                              round=self.live.round))
        if op == 2:  # signed for its own topic, published on another slave's
            own = t.slave("update", name)
            return Case("signed-for-other-topic", t.slave("update", rng.choice(self.roles.honest)),
                        evil.seal(own, "update", self._update_body(self._evil_uid(), {})))
        if op == 3:  # a message of another job (signed for its topic, or for this one), sent here
            signed_for = rng.choice([Topics("other").slave("update", name), t.slave("update", name)])
            return Case("other-job", t.slave("update", name),
                        evil.seal(signed_for, "update", self._update_body(self._evil_uid(), {}), job="other"))
        # an update of another run of the job: updates carry no run, so it is only a stray key
        # (and tensors that do not fit the model)
        body = {**self._update_body(self._evil_uid(), {"x": encode_tensor(torch.zeros(1))}),
                "run": rng.choice([self.live.run, "other-run", ""])}
        topic = t.slave("update", name)
        return Case("update-with-run", topic, evil.seal(topic, "update", body, version=self.live.version,
                                                        round=self.live.round))

    # -- other keys ---------------------------------------------------------------

    def rogue_games(self) -> Case:
        """An allowlisted key that never enrolls: updates, presence, and seq far ahead (< 1 day),
        which locks this key out of that topic for the rest of the run."""
        rng, rogue, t = self.rng, self.roles.rogue, self.roles.topics
        name = rogue.identity.name
        topic = t.slave(rng.choice(["update", "presence"]), name)
        kind = "update" if topic.split("/")[-2] == "update" else "presence"
        body = self._update_body(f"{name}/{self.live.round}/{self.live.version}",
                                 encode_state_dict(self.roles.evil_tensors(1))) if kind == "update" \
            else {"state": "online", "version": 0}
        seq = rogue.next_seq + rng.choice([0, 3600 * 10**6, 80_000 * 10**6]) if rng.random() < 0.3 else None
        return Case(f"rogue-{kind}" + ("-seq-ahead" if seq else ""), topic,
                    rogue.seal(topic, kind, body, version=self.live.version, round=self.live.round,
                               **({"seq": seq} if seq else {})))

    def outsider_games(self) -> Case:
        """A key the allowlist does not hold: self-signed confirms (some with the wrong key inside)."""
        rng, out, t = self.rng, self.roles.outsider, self.roles.topics
        name = out.identity.name
        victim = rng.choice([name, *self.roles.honest, self.roles.evil.identity.name])
        topic = t.slave(rng.choice(["confirm", "confirm", "update", "presence"]), victim)
        pub = rng.choice([_raw_public(out.identity), _raw_public(self.roles.evil.identity), b"\x00" * 32])
        body = {"public_key": pub, "samples": rng.choice([1, 10**9]), "capabilities": {}}
        overrides = {"sender": victim} if victim != name else {}
        chunk = 64 if rng.random() < 0.2 else 1 << 30  # a self-signed message in chunks
        return Case("outsider-confirm", topic, out.seal(topic, rng.choice(["confirm", "decline", "update"]), body,
                                                        chunk_size=chunk, **overrides))

    def forged_master(self) -> Case:
        """The master's messages forged by the evil key (its kid, or the master's kid with
        the evil key's signature), with hostile bodies, on the slaves' topics."""
        rng, evil, t = self.rng, self.roles.evil, self.roles.topics
        topic = rng.choice([t.master("instruction"), t.master("model"), t.master("round"), t.master("delta"),
                            t.direct(rng.choice(self.roles.honest))])
        name = topic.split("/")[-1] if "/to/" not in topic else "model"
        spec_model = {"arch": "mlp", "sizes": rng.choice([[64, 10**9, 10], [64, 128, 10], [64] * 10_000, "x"]), "seed": 0}
        bodies = {
            "instruction": {"run": "forged", "task": "digits", "model": spec_model, "train": {"epochs": 10**9},
                            "update": "delta", "requirements": {}, "round_policy": {"asynchronous": True}},
            "model": {"run": self.live.run, "tensors": hostile_tensors(rng, self.roles.spec)[1]},
            "delta": {"run": self.live.run, "base_version": self.live.version, "base_digest": b"\x00" * 32,
                      "tensors": hostile_tensors(rng, self.roles.spec)[1]},
            "round": {"run": self.live.run, "participants": self.roles.honest * rng.choice([1, 50_000]), "received": [],
                      "deadline": rng.choice([math.inf, math.nan, 1e300]), "update": "delta"},
        }
        kind = rng.choice(["instruction", "model", "round", "reconfirm"]) if "/to/" in topic else name
        body = bodies.get(kind, {"run": self.live.run, "reason": "x"})
        kid = self.roles.kids.get("master") if rng.random() < 0.5 else None
        raw = cbor2.dumps(body)
        m = Manifest(kind=kind, job=t.job, sender="master", topic=topic.split("/chunk/")[0], seq=int(2**62),
                     ts=0, version=self.live.version + rng.choice([1, 1000]), round=self.live.round + 1,
                     size=len(raw), sha256=hashlib.sha256(raw).digest(), chunks=1)
        payloads = evil.sign_payload(m.topic, m.encode(), [raw], chunked=False, kid=kid)
        return Case("forged-master:" + kind, topic, payloads, retain=rng.random() < 0.3)


def _raw_public(identity: Identity) -> bytes:
    return raw_public_bytes(identity.public_key)


def _deep_map(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": 1.0}
    for _ in range(depth):
        out = {"n": out}
    return out


def enrollment_messages(roles: Roles) -> list[tuple[str, bytes, bool]]:
    """(topic, payload, retain) that enroll the evil key: confirm, then presence online."""
    evil, t = roles.evil, roles.topics
    name = evil.identity.name
    confirm = t.slave("confirm", name)
    presence = t.slave("presence", name)
    body = {"public_key": _raw_public(evil.identity), "samples": EVIL_SAMPLES,
            "capabilities": {"update": ["delta"], "torch": torch.__version__, "machine": "fuzz"}}
    out = [(confirm, p, False) for p in evil.seal(confirm, "confirm", body)]
    out += [(presence, p, True) for p in evil.seal(presence, "presence", {"state": "online", "version": -1})]
    return out
