"""Fixtures shared by the wire-layer unit tests (envelope, chunks, tensors, fuzz, vectors).

`wire` bundles what those tests keep needing: deterministic identities (a master and
two slaves, all enrolled), sealers and inboxes on one job, a small update body, and
low-level builders for hand-crafted COSE_Sign1 messages (to test what our own
`Sealer` would never produce). Nothing here touches the network or a clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import cbor2
import pytest
import torch
from cbor2 import CBORTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.common import envelope, messages
from fedmq.common.channel import Inbox, Received, Sealer
from fedmq.common.chunks import DEFAULT_CHUNK_SIZE, ReassemblyLimits
from fedmq.common.envelope import Manifest
from fedmq.common.keys import Identity, KeyRing, raw_public_bytes
from fedmq.common.tensors import encode_state_dict
from fedmq.common.topics import Topics

JOB = "job-1"
NOW = 1_700_000_000.0  # a fixed clock: the wire layer takes time as an argument


def make_identity(name: str) -> Identity:
    """An Ed25519 identity derived from its name: reproducible across runs."""
    seed = hashlib.sha256(f"fedmq unit test key {name}".encode()).digest()
    return Identity(name, Ed25519PrivateKey.from_private_bytes(seed))


@dataclass
class Wire:
    """One job's participants and the tools to talk between them."""

    topics: Topics = field(default_factory=lambda: Topics(JOB))
    master: Identity = field(default_factory=lambda: make_identity("master"))
    slave: Identity = field(default_factory=lambda: make_identity("slave-01"))
    other: Identity = field(default_factory=lambda: make_identity("slave-02"))

    @property
    def keyring(self) -> KeyRing:
        ring = KeyRing()
        for ident in (self.master, self.slave, self.other):
            ring.add(ident.name, ident.public_key)
        return ring

    # -- honest senders and receivers

    def sealer(self, identity: Identity | None = None, *, seq: int = 1, job: str = JOB,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Sealer:
        return Sealer(identity or self.slave, job, seq=seq, chunk_size=chunk_size)

    def inbox(self, *, keyring: KeyRing | None = None, job: str = JOB,
              self_signed: Iterable[str] = messages.SELF_SIGNED_KINDS,
              reassembly: ReassemblyLimits = ReassemblyLimits()) -> Inbox:
        return Inbox(self.keyring if keyring is None else keyring, job,
                     self_signed=self_signed, reassembly=reassembly)

    def update_topic(self, identity: Identity | None = None) -> str:
        return self.topics.slave("update", (identity or self.slave).name)

    @staticmethod
    def update_body(tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        if tensors is None:
            torch.manual_seed(0)
            tensors = {"w": torch.randn(4, 3), "b": torch.zeros(3)}
        return {
            "update_id": "u-1", "kind": "delta", "base_version": 1, "samples": 10,
            "metrics": {"loss": 0.5}, "tensors": encode_state_dict(tensors),
        }

    def sealed_update(self, *, seq: int = 1, identity: Identity | None = None, topic: str | None = None,
                      tensors: dict[str, torch.Tensor] | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, job: str = JOB) -> list[bytes]:
        """The payloads (one, or the chunks) of a signed update, as the slave publishes them."""
        ident = identity or self.slave
        sealer = self.sealer(ident, seq=seq, job=job, chunk_size=chunk_size)
        return sealer.seal(topic or self.update_topic(ident), messages.UPDATE, self.update_body(tensors),
                           now=NOW, version=1, round=1)

    def sealed_presence(self, *, seq: int = 1, identity: Identity | None = None) -> bytes:
        """A small single-payload message (for byte-by-byte tampering)."""
        ident = identity or self.slave
        (payload,) = self.sealer(ident, seq=seq).seal(
            self.topics.slave("presence", ident.name), messages.PRESENCE, {"state": "online", "version": 1}, now=NOW)
        return payload

    def confirm_body(self, identity: Identity | None = None) -> dict[str, Any]:
        ident = identity or self.slave
        return {"public_key": raw_public_bytes(ident.public_key), "samples": 5, "capabilities": {}}

    @staticmethod
    def deliver(inbox: Inbox, topic: str, payloads: Iterable[bytes], now: float = NOW) -> list[Received]:
        """Feed payloads in order; the completed messages."""
        out = []
        for p in payloads:
            r = inbox.receive(topic, p, now)
            if r is not None:
                out.append(r)
        return out

    # -- building blocks for messages an honest Sealer never produces

    @staticmethod
    def manifest(identity: Identity, topic: str, body: bytes, **overrides: Any) -> Manifest:
        m = Manifest(kind=messages.UPDATE, job=JOB, sender=identity.name, topic=topic, seq=1, ts=0,
                     version=0, round=0, size=len(body), sha256=hashlib.sha256(body).digest())
        return replace(m, **overrides)

    @staticmethod
    def cose(protected: bytes, unprotected: dict, payload: bytes, signature: bytes) -> bytes:
        return cbor2.dumps(CBORTag(envelope.COSE_SIGN1_TAG, [protected, unprotected, payload, signature]))

    @staticmethod
    def sign_with(identity: Identity, protected: bytes, topic: str, payload: bytes) -> bytes:
        """A genuine Ed25519 signature over any protected header and payload."""
        return identity.private_key.sign(envelope.sig_structure(protected, topic, payload))

    @staticmethod
    def fields(payload: bytes) -> list[Any]:
        """[protected, unprotected (mutable dict), manifest payload, signature] of a payload."""
        tag = cbor2.loads(payload)
        assert isinstance(tag, CBORTag) and tag.tag == envelope.COSE_SIGN1_TAG
        protected, unprotected, manifest, signature = tag.value
        return [protected, dict(unprotected), manifest, signature]

    def rebuild(self, payload: bytes, edit: Callable[[list[Any]], None]) -> bytes:
        """Decode a payload, let `edit` change its four fields in place, re-encode it."""
        f = self.fields(payload)
        edit(f)
        return cbor2.dumps(CBORTag(envelope.COSE_SIGN1_TAG, f))


@pytest.fixture(scope="session")
def wire() -> Wire:
    """Stateless (every inbox and sealer it hands out is new), so one per session."""
    return Wire()
