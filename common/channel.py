"""The two ends of a signed fedmq channel: `Sealer` (send) and `Inbox` (receive).

`Sealer` turns (topic, kind, body) into the MQTT payloads to publish, numbering
messages with a per-sender sequence number that only grows. `Inbox` turns received
payloads back into verified `Received` messages, applying every check of the
protocol in a fixed order (structure, key, signature, job, sender, replay, chunks,
size, digest) and raising `ProtocolError` with the reason of the first that fails.
Both are pure: time comes in as an argument.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import cbor2

from .chunks import DEFAULT_CHUNK_SIZE, Reassembler, ReassemblyLimits, split
from .envelope import Envelope, Manifest, check_body, loads, parse, sign, verify_signature
from .errors import ProtocolError, Reason
from .keys import Identity, KeyRing, key_id, public_key_from_raw


def initial_seq(now: float, persisted: int = 0) -> int:
    """First sequence number of a process: above anything it may have sent before.

    Microseconds since the epoch grow across restarts even when the state file was
    lost; `persisted` (last seq written to a state file) guards against a clock that
    was set back.
    """
    return max(int(now * 1_000_000), persisted + 1)


class Sealer:
    """Signs and chunks outgoing messages for one identity and job."""

    def __init__(self, identity: Identity, job: str, *, seq: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.identity = identity
        self.job = job
        self.next_seq = seq
        self.chunk_size = chunk_size

    def seal(self, topic: str, kind: str, body: dict[str, Any], *, now: float, version: int = 0, round: int = 0) -> list[bytes]:
        raw = cbor2.dumps(body)
        return self.seal_raw(topic, kind, raw, now=now, version=version, round=round)

    def seal_raw(self, topic: str, kind: str, raw: bytes, *, now: float, version: int = 0, round: int = 0) -> list[bytes]:
        parts = split(raw, self.chunk_size)
        manifest = Manifest(
            kind=kind, job=self.job, sender=self.identity.name, topic=topic, seq=self.next_seq,
            ts=int(now * 1000), version=version, round=round, size=len(raw),
            sha256=hashlib.sha256(raw).digest(), chunks=len(parts),
        )
        self.next_seq += 1
        return sign(self.identity, topic, manifest, parts)


@dataclass(frozen=True)
class Received:
    """A message that passed every check. `enrolled` is False for a self-signed
    enrollment request whose key the receiver does not know yet."""

    topic: str
    manifest: Manifest
    body: dict[str, Any]
    raw: bytes = field(repr=False)  # the verified CBOR `body` was decoded from
    enrolled: bool = True

    @property
    def size(self) -> int:
        """Bytes of the body on the wire."""
        return len(self.raw)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def sender(self) -> str:
        return self.manifest.sender


class Inbox:
    """Verifies, de-duplicates and reassembles what one participant receives.

    `self_signed` names kinds that may come from an unknown key, provided the body
    carries that key (`public_key`, raw Ed25519) and the message is signed with it:
    that is how a new slave asks to enroll. Whether to admit it is policy, decided
    by the master core, not here.
    """

    def __init__(
        self,
        keyring: KeyRing,
        job: str,
        *,
        self_signed: Iterable[str] = (),
        reassembly: ReassemblyLimits = ReassemblyLimits(),
    ) -> None:
        self.keyring = keyring
        self.job = job
        self.self_signed = frozenset(self_signed)
        self.reassembler = Reassembler(reassembly)
        self.last_seq: dict[tuple[bytes, str], int] = {}

    def receive(self, topic: str, payload: bytes, now: float, *, retained: bool = False) -> Received | None:
        """A verified message, or None while a chunked message is incomplete.

        `retained` is the MQTT retain flag of the delivery, which only the broker sets:
        a retained message may repeat the last accepted sequence number (the broker
        hands the current retained state to every new subscription), never go below it.
        """
        env = parse(payload)
        key = (env.kid, topic)
        slot = (env.kid, topic, env.payload)
        if self.reassembler.has(slot):
            self.reassembler.check_fingerprint(slot, (env.protected, env.signature))
            body = self.reassembler.add(slot, env.chunk[0] if env.chunk else 0, env.part, now)
            if body is None:
                return None
            return self._accept(topic, key, Manifest.decode(env.payload), body, True, retained)
        manifest, enrolled = self._verify(env, topic)
        self._check_fresh(key, manifest, retained)
        if manifest.chunks == 1:
            return self._accept(topic, key, manifest, env.part, enrolled, retained)
        if not enrolled:
            raise ProtocolError(Reason.TOO_LARGE, "enrollment requests must fit in one chunk")
        self.reassembler.open(slot, env.kid, (env.protected, env.signature), manifest.size, manifest.chunks, now)
        body = self.reassembler.add(slot, env.chunk[0], env.part, now)
        return None if body is None else self._accept(topic, key, manifest, body, True, retained)

    def expire(self, now: float) -> int:
        """Drop partial messages past the reassembly timeout; how many were dropped."""
        return len(self.reassembler.expire(now))

    def _verify(self, env: Envelope, topic: str) -> tuple[Manifest, bool]:
        known = self.keyring.lookup(env.kid)
        if known is not None:
            name, public_key = known
            manifest = verify_signature(env, public_key, topic)
            enrolled = True
        else:
            claimed = env.manifest_unverified()
            if claimed.kind not in self.self_signed or claimed.chunks != 1:
                raise ProtocolError(Reason.UNKNOWN_KID, f"no key {env.kid.hex()} (claims to be {claimed.sender!r})")
            public_key = self._claimed_key(env)
            manifest = verify_signature(env, public_key, topic)
            name, enrolled = manifest.sender, False
        if manifest.job != self.job:
            raise ProtocolError(Reason.WRONG_JOB, f"message for job {manifest.job!r}, this is {self.job!r}")
        if manifest.sender != name:
            raise ProtocolError(Reason.WRONG_SENDER, f"key of {name!r} used by {manifest.sender!r}")
        return manifest, enrolled

    def _claimed_key(self, env: Envelope):
        body = loads(env.part)
        raw = body.get("public_key") if isinstance(body, dict) else None
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise ProtocolError(Reason.UNKNOWN_KID, "unknown key and no public_key in the body")
        public_key = public_key_from_raw(raw)
        if key_id(public_key) != env.kid:
            raise ProtocolError(Reason.BAD_SIGNATURE, "kid does not match the enclosed public key")
        return public_key

    def _check_fresh(self, key: tuple[bytes, str], manifest: Manifest, retained: bool) -> None:
        last = self.last_seq.get(key)
        if last is not None and (manifest.seq < last or manifest.seq == last and not retained):
            raise ProtocolError(Reason.REPLAY, f"seq {manifest.seq} <= last accepted {last} on this topic")

    def _accept(
        self, topic: str, key: tuple[bytes, str], manifest: Manifest, body: bytes, enrolled: bool, retained: bool
    ) -> Received:
        check_body(manifest, body)
        self._check_fresh(key, manifest, retained)
        decoded = loads(body) if body else {}
        if not isinstance(decoded, dict):
            raise ProtocolError(Reason.BAD_BODY, "body must be a CBOR map")
        self.last_seq[key] = manifest.seq
        return Received(topic, manifest, decoded, body, enrolled)

    # Replay state survives restarts of the master through its checkpoint.
    def export_replay_state(self) -> list[list[Any]]:
        return [[kid, topic, seq] for (kid, topic), seq in self.last_seq.items()]

    def load_replay_state(self, rows: Iterable[list[Any]]) -> None:
        for kid, topic, seq in rows:
            self.last_seq[(bytes(kid), str(topic))] = max(int(seq), self.last_seq.get((bytes(kid), str(topic)), -1))
