"""Chunking of large bodies, and their bounded reassembly.

Brokers cap packet sizes (AWS IoT 128 KB, Azure IoT Hub 256 KB), so a body larger
than the chunk size is sent as several publishes on the same topic (see
`envelope.sign`). The receiver keeps partial bodies in a `Reassembler`, which:

* accepts chunks in any order and ignores duplicates;
* bounds memory per sender and in total, and the number of chunks and bytes a
  message may claim, so an endless or oversized stream is cut off;
* drops partial messages after a timeout (time is an argument: no clock here);
* returns the body only when every chunk is present and the slices, joined in
  index order, have the signed size and SHA-256.

A slot is opened only for a message whose signature has been verified, so an
unauthenticated party cannot fill the buffers; the remaining chunks must repeat
the exact signed header, manifest and signature of the first.

The signature covers the manifest, not the slices: anyone who can read one chunk
of a message on the broker and publish on its topic can send a chunk that repeats
the signed header with a forged slice. Were the first slice of an index to win,
such a chunk arriving before the genuine one would make the genuine message fail
its digest (the genuine slice then being "a duplicate"). So a slot keeps up to
`max_spare_slices` distinct extra slices per message, and on completion tries the
combinations of candidates whose lengths add up to the signed size, each at most
once over the slot's life: at most 2 ** max_spare_slices digests of the body per
message, whatever is sent.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Hashable

from .errors import ProtocolError, Reason

DEFAULT_CHUNK_SIZE = 64 * 1024  # well under AWS IoT's 128 KB per publish
# What a partial message and each stored chunk cost beyond their body bytes (key,
# signed header, slot object, dict entries, bytes headers: ~0.9 kB and ~65-100 B
# measured in CPython 3.11). Charged against the budgets, so that tiny chunks or
# many barely-started messages cannot pin far more memory than the budgets say.
SLOT_OVERHEAD = 2048
PART_OVERHEAD = 128


def split(body: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Slices of at most chunk_size bytes (one, possibly empty, slice for a small body)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if len(body) <= chunk_size:
        return [body]
    view = memoryview(body)
    return [bytes(view[i : i + chunk_size]) for i in range(0, len(body), chunk_size)]


def max_slice(size: int, count: int) -> int:
    """The longest slice `split` can produce for a body of `size` bytes in `count` chunks.

    `split` cuts `count - 1` full slices of C bytes and a last, shorter or equal one,
    so (count - 1) * C < size: no slice of a conforming sender is longer than this.
    """
    return size if count <= 1 else (size - 1) // (count - 1)


@dataclass(frozen=True)
class ReassemblyLimits:
    max_body: int = 64 * 1024 * 1024  # a body must fit the per-sender budget to ever complete
    max_chunks: int = 16384
    max_pending_per_sender: int = 64 * 1024 * 1024
    max_pending_total: int = 512 * 1024 * 1024
    timeout: float = 120.0  # seconds from a message's first chunk
    # Distinct slices a partial message may hold beyond one per index (forged copies
    # of its signed header); bounds the digests tried per message to 2 ** this.
    max_spare_slices: int = 3


@dataclass(frozen=True)
class Completed:
    """A reassembled body that matched the signed size and digest."""

    body: bytes
    wire_bytes: int  # the callers' per-chunk byte counts (MQTT payloads) of the slices used


@dataclass
class _Slot:
    sender: Hashable
    fingerprint: tuple[bytes, ...]
    size: int
    count: int
    sha256: bytes
    started: float
    # index -> distinct candidate slices, in arrival order, each with its caller's byte count
    parts: dict[int, list[tuple[bytes, int]]] = field(default_factory=dict)
    spares: int = 0  # candidates beyond the first of their index
    charged: int = 0  # stored bytes + bookkeeping overhead, as counted against the budgets

    @property
    def max_slice(self) -> int:
        return max_slice(self.size, self.count)


class Reassembler:
    """Partial bodies keyed by the caller's message key (e.g. (kid, topic, manifest))."""

    def __init__(self, limits: ReassemblyLimits = ReassemblyLimits()) -> None:
        self.limits = limits
        self._slots: dict[Hashable, _Slot] = {}
        self._per_sender: dict[Hashable, int] = {}
        self._total = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held in partial messages, bookkeeping overhead included."""
        return self._total

    def __len__(self) -> int:
        return len(self._slots)

    def has(self, key: Hashable) -> bool:
        return key in self._slots

    def check_chunk(self, key: Hashable, fingerprint: tuple[bytes, ...], chunk: tuple[int, int] | None) -> None:
        """A further chunk must repeat its message's signed parts byte for byte and its
        chunk count. Refusing one never touches the partial message: such a chunk is
        unauthenticated, and dropping the slot for it would let anyone cancel it."""
        slot = self._slots[key]
        if slot.fingerprint != fingerprint:
            raise ProtocolError(Reason.BAD_CHUNK, "chunk does not carry the signed header of its message")
        if chunk is None or chunk[1] != slot.count:
            raise ProtocolError(Reason.BAD_CHUNK, f"chunk header {chunk} for a message of {slot.count} chunks")

    def open(self, key: Hashable, sender: Hashable, fingerprint: tuple[bytes, ...], *,
             size: int, count: int, sha256: bytes, now: float) -> None:
        """Start a message after its first chunk's signature verified."""
        lim = self.limits
        if size > lim.max_body:
            raise ProtocolError(Reason.TOO_LARGE, f"body of {size} B exceeds {lim.max_body} B")
        if count > lim.max_chunks or count > size + 1:
            raise ProtocolError(Reason.TOO_LARGE, f"{count} chunks for {size} B")
        self._check_budget(sender, SLOT_OVERHEAD)
        self._slots[key] = _Slot(sender, fingerprint, size, count, sha256, now)
        self._charge(self._slots[key], SLOT_OVERHEAD)

    def add(self, key: Hashable, index: int, part: bytes, now: float, wire_bytes: int) -> Completed | None:
        """Store one candidate slice; the body once a combination matches the signed digest.

        Raises BAD_CHUNK or TOO_LARGE for a slice that cannot be stored (the partial
        message is kept, except when a first slice for an index does not fit the
        budgets: then it can never complete); SIZE_MISMATCH or DIGEST_MISMATCH when
        the message is complete but no untried combination matches (kept while a
        spare slice may still come, so a genuine slice arriving after a forged one
        still completes it).
        """
        slot = self._slots[key]
        if not 0 <= index < slot.count:
            raise ProtocolError(Reason.BAD_CHUNK, f"chunk {index} of {slot.count}")
        if len(part) > slot.max_slice:
            raise ProtocolError(Reason.BAD_CHUNK, f"a {len(part)} B slice; chunks of a {slot.size} B body in "
                                                  f"{slot.count} are at most {slot.max_slice} B")
        candidates = slot.parts.get(index, [])
        if any(c == part for c, _ in candidates):
            return None  # duplicate (QoS 1 redelivery)
        spare = bool(candidates)
        if spare and slot.spares >= self.limits.max_spare_slices:
            raise ProtocolError(Reason.TOO_LARGE, f"more than {self.limits.max_spare_slices} conflicting "
                                                  "slices for one message")
        cost = len(part) + PART_OVERHEAD
        try:
            self._check_budget(slot.sender, cost)
        except ProtocolError:
            if not spare:
                self._drop(key)
            raise
        slot.parts.setdefault(index, []).append((part, wire_bytes))
        slot.spares += spare
        self._charge(slot, cost)
        if len(slot.parts) < slot.count:
            return None
        return self._complete(key, slot, index)

    def expire(self, now: float) -> list[tuple[Hashable, int]]:
        """Drop messages whose first chunk is older than the timeout; their keys and
        how many distinct chunk indices each had received."""
        old = [(k, len(s.parts)) for k, s in self._slots.items() if now - s.started > self.limits.timeout]
        for k, _ in old:
            self._drop(k)
        return old

    def _complete(self, key: Hashable, slot: _Slot, index: int) -> Completed:
        """Try every combination that uses the newest candidate (the others were tried
        when their own newest candidate arrived): each combination once per slot."""
        choices = [slot.parts[i] if i != index else slot.parts[i][-1:] for i in range(slot.count)]
        forks = [i for i, c in enumerate(choices) if len(c) > 1]
        fixed_length = sum(len(c[0][0]) for c in choices if len(c) == 1)
        sized = False
        for picks in itertools.product(*(range(len(choices[i])) for i in forks)):
            if fixed_length + sum(len(choices[i][p][0]) for i, p in zip(forks, picks)) != slot.size:
                continue  # cheap: only combinations of the signed size are hashed
            sized = True
            chosen = [c[0] for c in choices]
            for i, p in zip(forks, picks):
                chosen[i] = choices[i][p]
            digest = hashlib.sha256()
            for part, _ in chosen:
                digest.update(part)
            if digest.digest() == slot.sha256:
                self._drop(key)
                return Completed(b"".join(p for p, _ in chosen), sum(w for _, w in chosen))
        if slot.spares >= self.limits.max_spare_slices:
            self._drop(key)  # no further slice can be stored: nothing is left to try
        if not sized:
            raise ProtocolError(Reason.SIZE_MISMATCH, f"no combination of the received slices is {slot.size} B")
        raise ProtocolError(Reason.DIGEST_MISMATCH, "reassembled body does not match the signed SHA-256")

    def _check_budget(self, sender: Hashable, n: int) -> None:
        if self._per_sender.get(sender, 0) + n > self.limits.max_pending_per_sender:
            raise ProtocolError(Reason.TOO_LARGE, "sender has too many bytes in partial messages")
        if self._total + n > self.limits.max_pending_total:
            raise ProtocolError(Reason.TOO_LARGE, "reassembly buffers are full")

    def _charge(self, slot: _Slot, n: int) -> None:
        slot.charged += n
        self._per_sender[slot.sender] = self._per_sender.get(slot.sender, 0) + n
        self._total += n

    def _drop(self, key: Hashable) -> None:
        slot = self._slots.pop(key)
        left = self._per_sender[slot.sender] - slot.charged if slot.sender in self._per_sender else 0
        if left > 0:
            self._per_sender[slot.sender] = left
        else:
            self._per_sender.pop(slot.sender, None)
        self._total -= slot.charged
