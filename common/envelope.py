"""The signed envelope: COSE_Sign1 (RFC 9052) over a small manifest, hash-then-sign.

One MQTT payload is one CBOR item:

    18([ protected:   bstr .cbor {1: -8, 4: kid},          ; alg EdDSA, sender key id
         unprotected: {-65537: body-or-chunk, ? -65538: [index, count]},
         payload:     bstr .cbor manifest,
         signature:   bstr ])                               ; Ed25519, 64 bytes

The signature covers `["Signature1", protected, topic (UTF-8, as external_aad), payload]`,
so a message cannot be moved to another topic. The manifest carries the SHA-256 and
size of the (possibly large) body, which is checked against the signed digest instead
of being signed itself: signing 32 bytes is nearly free, whatever the model size.
A body larger than the chunk size travels as several publishes that repeat the same
protected header, manifest and signature, each with one slice of the body; see
`chunks.py`. Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import cbor2
from cbor2 import CBORTag
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import ProtocolError, Reason
from .keys import KID_LENGTH, Identity

PROTOCOL_VERSION = 1
COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_KID = 4
ALG_EDDSA = -8
HDR_BODY = -65537  # private-use labels (RFC 9052 §3.1: < -65536)
HDR_CHUNK = -65538
SIGNATURE_LENGTH = 64
MAX_MANIFEST_BYTES = 1024
MAX_INDEFINITE_DEPTH = 16

_MANIFEST_TYPES: dict[str, type] = {
    "v": int, "kind": str, "job": str, "sender": str, "topic": str, "seq": int, "ts": int,
    "version": int, "round": int, "size": int, "sha256": bytes, "chunks": int,
}


@dataclass(frozen=True)
class Manifest:
    """What the sender signs: who, what, when, and the digest of the body."""

    kind: str
    job: str
    sender: str
    topic: str  # also bound as external_aad; here so a misrouted message can be named as such
    seq: int
    ts: int  # milliseconds since the Unix epoch, sender's clock (informational)
    version: int  # model version the message refers to (0 when none)
    round: int  # training round (0 when none)
    size: int  # body length in bytes
    sha256: bytes
    chunks: int = 1
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return cbor2.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> "Manifest":
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ProtocolError(Reason.MALFORMED, "manifest too large")
        m = loads(raw)
        if not isinstance(m, dict):
            raise ProtocolError(Reason.MALFORMED, "manifest is not a map")
        v = m.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:  # 1.0 == 1 and True == 1 in Python: not a version
            raise ProtocolError(Reason.BAD_VERSION, f"protocol version {v!r} (this is the integer {PROTOCOL_VERSION})")
        if set(m) != set(_MANIFEST_TYPES):
            raise ProtocolError(Reason.MALFORMED, f"manifest keys {sorted(map(str, m))}")
        for key, typ in _MANIFEST_TYPES.items():
            if type(m[key]) is not typ or (typ is int and m[key] < 0):
                raise ProtocolError(Reason.MALFORMED, f"manifest field {key!r} must be {typ.__name__}")
        if len(m["sha256"]) != 32 or m["chunks"] < 1:
            raise ProtocolError(Reason.MALFORMED, "manifest sha256/chunks out of range")
        return cls(**m)


@dataclass(frozen=True)
class Envelope:
    """A parsed COSE_Sign1 whose signature has *not* been checked yet."""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes
    part: bytes  # the whole body, or one chunk of it
    chunk: tuple[int, int] | None  # (index, count) when the body is chunked

    def manifest_unverified(self) -> Manifest:
        """Read the manifest before verifying, only to choose how to verify (e.g. which key)."""
        return Manifest.decode(self.payload)


def loads(data: bytes) -> Any:
    """cbor2.loads with the bounds fedmq applies to anything from the network.

    Tags are left as `CBORTag` (cbor2 6 would otherwise expand RFC 8746 typed arrays
    into tuples of Python numbers: slow, and it loses the bytes we want zero-copy),
    and so are the tags cbor2 would interpret itself (see `_UNINTERPRETED`). Whatever
    the decoder raises on bad input becomes `ProtocolError(MALFORMED)`.

    One payload is exactly one CBOR item: trailing bytes and duplicate map keys
    (which decoders resolve differently: first or last wins) are MALFORMED.
    """
    try:
        fp = io.BytesIO(data)
        item = cbor2.CBORDecoder(fp, tag_hook=keep_tag, max_depth=MAX_INDEFINITE_DEPTH, **_STRICT).decode()
        end = fp.tell()
    except ProtocolError:
        raise
    except Exception as exc:  # the decoder is a black box fed by an attacker: any failure is malformed input
        raise ProtocolError(Reason.MALFORMED, f"not valid CBOR: {type(exc).__name__}: {str(exc)[:200]}") from None
    if end != len(data):
        raise ProtocolError(Reason.MALFORMED, f"{len(data) - end} bytes after the CBOR item")
    return item


def keep_tag(*args: Any) -> CBORTag:
    # cbor2 5 calls tag_hook(decoder, tag), cbor2 6 tag_hook(tag, immutable)
    return args[0] if isinstance(args[0], CBORTag) else args[1]


# Tags cbor2 6 decodes itself instead of calling tag_hook: dates (0, 1, 100, 1004),
# bignums (2, 3), decimal/bigfloat (4, 5), string and shared references (25, 256,
# 28, 29), rational (30), regex (35), MIME (36), UUID (37), IP addresses (52, 54,
# 260, 261), set (258), complex (43000), self-describe (55799). fedmq uses none of
# them, and on untrusted input each is attack surface: 36 runs the e-mail parser,
# 28/29 build self-referencing containers, 2/3 turn a few kB into an int whose repr
# raises. They stay plain `CBORTag`s, which the schema checks then reject.
_UNINTERPRETED = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)


def _as_tag(tag: int) -> Any:
    return lambda value, immutable=False: CBORTag(tag, value)


def _strict_options() -> dict[str, Any]:
    opts: dict[str, Any] = {"semantic_decoders": {t: _as_tag(t) for t in _UNINTERPRETED}, "allow_duplicate_keys": False}
    try:
        cbor2.CBORDecoder(io.BytesIO(b"\x00"), **opts).decode()
    except TypeError:  # cbor2 < 6 has neither option
        return {}
    return opts


_STRICT = _strict_options()


def sig_structure(protected: bytes, topic: str, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, topic.encode("utf-8"), payload])


def protected_header(kid: bytes) -> bytes:
    return cbor2.dumps({HDR_ALG: ALG_EDDSA, HDR_KID: kid})


def sign(identity: Identity, topic: str, manifest: Manifest, parts: list[bytes]) -> list[bytes]:
    """Sign the manifest once and wrap each body part (one, or the chunks) in its own COSE_Sign1."""
    protected = protected_header(identity.kid)
    payload = manifest.encode()
    signature = identity.private_key.sign(sig_structure(protected, topic, payload))
    count = len(parts)
    out = []
    for index, part in enumerate(parts):
        unprotected: dict[int, Any] = {HDR_BODY: part}
        if count > 1:
            unprotected[HDR_CHUNK] = [index, count]
        out.append(cbor2.dumps(CBORTag(COSE_SIGN1_TAG, [protected, unprotected, payload, signature])))
    return out


def parse(data: bytes) -> Envelope:
    """Structure checks only; every deviation is `Reason.MALFORMED` or `UNSUPPORTED_ALG`."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(Reason.MALFORMED, "payload must be bytes")
    obj = loads(bytes(data))
    if not isinstance(obj, CBORTag) or obj.tag != COSE_SIGN1_TAG:
        raise ProtocolError(Reason.MALFORMED, "not a tagged COSE_Sign1 (tag 18)")
    v = obj.value
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise ProtocolError(Reason.MALFORMED, "COSE_Sign1 must be a 4-element array")
    protected, unprotected, payload, signature = v
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)) or not isinstance(unprotected, Mapping):
        raise ProtocolError(Reason.MALFORMED, "COSE_Sign1 element types")
    if len(signature) != SIGNATURE_LENGTH:
        raise ProtocolError(Reason.MALFORMED, "Ed25519 signatures are 64 bytes")
    hdr = loads(protected) if protected else {}
    if not isinstance(hdr, dict):
        raise ProtocolError(Reason.MALFORMED, "protected header is not a map")
    alg = label(hdr, HDR_ALG)
    if type(alg) is not int or alg != ALG_EDDSA:
        raise ProtocolError(Reason.UNSUPPORTED_ALG, f"alg {alg!r}; fedmq signs with EdDSA (the integer -8)")
    kid = label(hdr, HDR_KID)
    if not isinstance(kid, bytes) or len(kid) != KID_LENGTH:
        raise ProtocolError(Reason.MALFORMED, f"kid must be a {KID_LENGTH}-byte string in the protected header")
    part = label(unprotected, HDR_BODY)
    if not isinstance(part, bytes):
        raise ProtocolError(Reason.MALFORMED, "unprotected header lacks the body (-65537)")
    chunk = label(unprotected, HDR_CHUNK)
    if chunk is not None:
        if (
            not isinstance(chunk, (list, tuple)) or len(chunk) != 2
            or not all(type(x) is int for x in chunk) or not 0 <= chunk[0] < chunk[1]
        ):
            raise ProtocolError(Reason.BAD_CHUNK, "chunk header must be [index, count] with 0 <= index < count")
        chunk = (chunk[0], chunk[1])
    return Envelope(bytes(protected), kid, payload, signature, part, chunk)


def label(header: Mapping[Any, Any], key: int) -> Any:
    """The value of integer label `key` in a COSE header map, or None.

    Not `header.get(key)`: Python's dict treats 1.0 and True as the key 1 (and
    -65537.0 as -65537). COSE labels are integers or text; a float or boolean key
    is some other label, which receivers ignore, never the one asked for.
    """
    for k, value in header.items():
        if type(k) is int and k == key:
            return value
    return None


def verify_signature(env: Envelope, public_key: Ed25519PublicKey, topic: str) -> Manifest:
    """Check the signature for this topic; only then is the manifest trusted."""
    manifest = env.manifest_unverified()  # version/structure errors are reported first
    if not _valid(env, public_key, topic):
        if manifest.topic != topic and _valid(env, public_key, manifest.topic):
            raise ProtocolError(Reason.WRONG_TOPIC, f"signed for {manifest.topic!r}, received on {topic!r}")
        raise ProtocolError(Reason.BAD_SIGNATURE, "signature does not verify for this key and topic")
    expected = manifest.chunks if manifest.chunks > 1 else None
    if (env.chunk[1] if env.chunk else None) != expected:
        raise ProtocolError(Reason.BAD_CHUNK, "chunk header disagrees with the signed chunk count")
    return manifest


def _valid(env: Envelope, public_key: Ed25519PublicKey, topic: str) -> bool:
    try:
        public_key.verify(env.signature, sig_structure(env.protected, topic, env.payload))
        return True
    except InvalidSignature:
        return False


def check_body(manifest: Manifest, body: bytes) -> None:
    if len(body) != manifest.size:
        raise ProtocolError(Reason.SIZE_MISMATCH, f"body is {len(body)} B, manifest says {manifest.size} B")
    if hashlib.sha256(body).digest() != manifest.sha256:
        raise ProtocolError(Reason.DIGEST_MISMATCH, "body does not match the signed SHA-256")
