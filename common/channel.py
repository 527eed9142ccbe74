"""The two ends of a signed fedmq channel: `Sealer` (send) and `Inbox` (receive).

`Sealer` turns (topic, kind, body) into the MQTT payloads to publish, numbering
messages with a per-sender sequence number that only grows. `Inbox` turns received
payloads back into verified `Received` messages, applying every check of the
protocol in a fixed order (structure, key, signature, job, sender, seq not far
ahead of the clock, replay, chunks, size, digest) and raising `ProtocolError` with
the reason of the first that fails. Both are pure: time comes in as an argument.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import cbor2

from .chunks import DEFAULT_CHUNK_SIZE, Completed, Reassembler, ReassemblyLimits, split
from .envelope import Envelope, Manifest, check_body, loads, parse, sign, verify_signature
from .errors import ProtocolError, Reason
from .keys import Identity, KeyRing, key_id, public_key_from_raw

# How far (seconds) a sequence number may be ahead of the receiver's clock read as
# microseconds since the epoch. Senders seed their counters from that clock
# (`initial_seq`), so a legitimate seq is ahead only by the clocks' disagreement
# (a day covers a device whose clock runs on local time instead of UTC), or far
# below it (a small persisted counter). Accepting a seq from further in the future
# would turn every later genuine message of that key into a replay, for as long
# as the seq stays ahead: and the master keeps its replay table across restarts.
MAX_SEQ_AHEAD = 86_400.0


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

    def seal(self, topic: str, kind: str, body: dict[str, Any], *, now: float, version: int = 0, round: int = 0,
             whole: bool = False) -> list[bytes]:
        raw = cbor2.dumps(body)
        return self.seal_raw(topic, kind, raw, now=now, version=version, round=round, whole=whole)

    def seal_raw(self, topic: str, kind: str, raw: bytes, *, now: float, version: int = 0, round: int = 0,
                 whole: bool = False) -> list[bytes]:
        """`whole`: one payload whatever the chunk size (for receivers that share a
        subscription: the broker hands each message to one of them)."""
        parts = split(raw, max(self.chunk_size, len(raw)) if whole else self.chunk_size)
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
    # MQTT payload bytes (envelope and slice) of every chunk whose slice made the body,
    # as published; keyword-only, so no positional call can pass it by mistake
    wire_bytes: int = field(kw_only=True)

    @property
    def body_bytes(self) -> int:
        """Length of the CBOR body (the manifest's `size`)."""
        return len(self.raw)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def sender(self) -> str:
        return self.manifest.sender


@dataclass(frozen=True)
class Expired:
    """A partial message dropped at the reassembly timeout (`Reason.CHUNK_TIMEOUT`).

    Partial messages are opened only after a signature verified, so `sender` is
    always the verified name of the signing key."""

    sender: str
    topic: str  # the base topic
    kind: str
    seq: int
    received: int  # distinct chunk indices that had arrived
    chunks: int  # the signed chunk count


class Inbox:
    """Verifies, de-duplicates and reassembles what one participant receives.

    `self_signed` names kinds that may come from an unknown key, provided the body
    carries that key (`public_key`, raw Ed25519) and the message is signed with it:
    that is how a new slave asks to enroll. Whether to admit it is policy, decided
    by the master core, not here.

    `max_seq_ahead` (seconds, None for no bound) is how far a sequence number may
    be ahead of `now` (see `MAX_SEQ_AHEAD`); None only where freshness means
    nothing, e.g. checking a captured message.
    """

    def __init__(
        self,
        keyring: KeyRing,
        job: str,
        *,
        self_signed: Iterable[str] = (),
        reassembly: ReassemblyLimits = ReassemblyLimits(),
        max_seq_ahead: float | None = MAX_SEQ_AHEAD,
    ) -> None:
        self.keyring = keyring
        self.job = job
        self.self_signed = frozenset(self_signed)
        self.reassembler = Reassembler(reassembly)
        self.max_seq_ahead = max_seq_ahead
        self.last_seq: dict[tuple[bytes, str], int] = {}  # (kid, base topic) -> last accepted seq
        self.signers: dict[bytes, str] = {}  # kid -> the sender name it signed as (for reset_sender)

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
            self.reassembler.check_chunk(slot, (env.protected, env.signature), env.chunk)
            assert env.chunk is not None  # check_chunk refuses a chunk without a chunk header
            done = self.reassembler.add(slot, env.chunk[0], env.part, now, len(payload))
            return None if done is None else self._deliver(topic, key, Manifest.decode(env.payload), done, True,
                                                           retained, now)
        manifest, enrolled = self._verify(env, topic)
        self._check_fresh(key, manifest, retained, now)
        if manifest.chunks == 1:
            check_body(manifest, env.part)
            return self._deliver(topic, key, manifest, Completed(env.part, len(payload)), enrolled, retained, now)
        if not enrolled:
            raise ProtocolError(Reason.TOO_LARGE, "enrollment requests must fit in one chunk")
        assert env.chunk is not None  # verify_signature checked it against manifest.chunks > 1
        self.reassembler.open(slot, env.kid, (env.protected, env.signature), size=manifest.size,
                              count=manifest.chunks, sha256=manifest.sha256, now=now)
        done = self.reassembler.add(slot, env.chunk[0], env.part, now, len(payload))
        return None if done is None else self._deliver(topic, key, manifest, done, True, retained, now)

    def expire(self, now: float) -> list[Expired]:
        """Drop partial messages past the reassembly timeout; what was dropped, for
        counting `chunk_timeout` per sender."""
        out = []
        for (_kid, topic, payload), received in self.reassembler.expire(now):
            m = Manifest.decode(payload)  # verified when the partial message was opened
            out.append(Expired(m.sender, topic, m.kind, m.seq, received, m.chunks))
        return out

    def forget(self, kid: bytes) -> int:
        """Drop the replay state of one key on every topic; how many entries went.

        The way out of a lock-out (a seq accepted from a clock that was ahead, which
        makes every later genuine message a replay): the next message of this key on
        each topic is accepted whatever its seq, so one old message of it recorded by
        an attacker could be accepted once per topic. Call it only on an operator's
        decision (e.g. when re-enrolling a slave), and checkpoint afterwards.
        """
        gone = [k for k in self.last_seq if k[0] == kid]
        for k in gone:
            del self.last_seq[k]
        self.signers.pop(kid, None)
        return len(gone)

    def reset_sender(self, name: str) -> int:
        """`forget` every key that signed (or, by the key ring, signs) as `name`."""
        kids = {kid for kid, _ in self.last_seq if self._name_of(kid) == name}
        return sum(self.forget(kid) for kid in kids)

    def _name_of(self, kid: bytes) -> str | None:
        if kid in self.signers:
            return self.signers[kid]
        known = self.keyring.lookup(kid)
        return known[0] if known is not None else None

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

    def _check_fresh(self, key: tuple[bytes, str], manifest: Manifest, retained: bool, now: float) -> None:
        seq = manifest.seq
        limit = None if self.max_seq_ahead is None else int(now * 1_000_000) + int(self.max_seq_ahead * 1_000_000)
        if limit is not None and seq > limit:
            ahead = seq / 1_000_000 - now
            raise ProtocolError(Reason.SEQ_AHEAD, f"seq {seq} is {ahead:.0f} s ahead of this clock (at most "
                                                  f"{self.max_seq_ahead:.0f} s): is the sender's clock, or this "
                                                  "one, wrong?")
        last = self.last_seq.get(key)
        if last is not None and (seq < last or seq == last and not retained):
            hint = ""
            if limit is not None and last > limit:
                hint = (f"; the last accepted seq is {last / 1_000_000 - now:.0f} s ahead of this clock (from a clock "
                        "that was wrong?): resetting this key's replay state recovers it (PROTOCOL.md section 6)")
            raise ProtocolError(Reason.REPLAY, f"seq {seq} <= last accepted {last} on this topic{hint}")

    def _deliver(self, topic: str, key: tuple[bytes, str], manifest: Manifest, done: Completed, enrolled: bool,
                 retained: bool, now: float) -> Received:
        """A body whose size and digest matched: the replay check again (another copy may
        have completed meanwhile), decode, record the seq."""
        self._check_fresh(key, manifest, retained, now)
        decoded = loads(done.body) if done.body else {}
        if not isinstance(decoded, dict):
            raise ProtocolError(Reason.BAD_BODY, "body must be a CBOR map")
        self.last_seq[key] = manifest.seq
        self.signers[key[0]] = manifest.sender
        return Received(topic, manifest, decoded, done.body, enrolled, wire_bytes=done.wire_bytes)

    # Replay state survives restarts of the master through its checkpoint: rows of
    # [kid, base topic, last seq, sender name or None]. Rows of three (earlier
    # versions) load too.
    def export_replay_state(self) -> list[list[Any]]:
        return [[kid, topic, seq, self._name_of(kid)] for (kid, topic), seq in self.last_seq.items()]

    def load_replay_state(self, rows: Iterable[list[Any]]) -> None:
        for row in rows:
            kid, topic, seq = bytes(row[0]), str(row[1]), int(row[2])
            self.last_seq[(kid, topic)] = max(seq, self.last_seq.get((kid, topic), -1))
            if len(row) > 3 and row[3] is not None:
                self.signers.setdefault(kid, str(row[3]))
