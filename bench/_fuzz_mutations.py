"""Unsigned junk for bench/fuzz.py: raw CBOR, CBOR bombs, random items, and mutations of captured messages.

Byte-level mutations (bit flips, truncations, insertions, splices, length bombs) and
COSE-level ones (protected-header games, chunk headers and bodies in the unprotected
header, manifests changed field by field) of a valid captured payload. Each returns
`(game, payload)`: the name of what it did, for the findings. Where only the unsigned
COSE header changed, the signature still verifies and the chunk logic sees the junk.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any, Callable

import cbor2
from cbor2 import CBORTag

from fedmq.common.envelope import ALG_EDDSA, COSE_SIGN1_TAG, HDR_ALG, HDR_BODY, HDR_CHUNK, HDR_KID, protected_header


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
