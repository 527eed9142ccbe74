"""Chunking of large bodies, and their bounded reassembly.

Brokers cap packet sizes (AWS IoT 128 KB, Azure IoT Hub 256 KB), so a body larger
than the chunk size is sent as several publishes on the same topic (see
`envelope.sign`). The receiver keeps partial bodies in a `Reassembler`, which:

* accepts chunks in any order and ignores duplicates;
* bounds memory per sender and in total, and the number of chunks and bytes a
  message may claim, so an endless or oversized stream is cut off;
* drops partial messages after a timeout (time is an argument: no clock here);
* returns the body only when every chunk is present; the caller then checks it
  against the signed size and digest.

A slot is opened only for a message whose signature has been verified, so an
unauthenticated party cannot fill the buffers; the remaining chunks must repeat
the exact signed header, manifest and signature of the first.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class ReassemblyLimits:
    max_body: int = 64 * 1024 * 1024  # a body must fit the per-sender budget to ever complete
    max_chunks: int = 16384
    max_pending_per_sender: int = 64 * 1024 * 1024
    max_pending_total: int = 512 * 1024 * 1024
    timeout: float = 120.0  # seconds from a message's first chunk


@dataclass
class _Slot:
    sender: Hashable
    fingerprint: tuple[bytes, ...]
    size: int
    count: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0  # body bytes stored
    charged: int = 0  # held + bookkeeping overhead, as counted against the budgets


class Reassembler:
    """Partial bodies keyed by the caller's message key (e.g. (kid, topic, seq))."""

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

    def check_fingerprint(self, key: Hashable, fingerprint: tuple[bytes, ...]) -> None:
        """A chunk of a known message must repeat its signed parts byte for byte."""
        if self._slots[key].fingerprint != fingerprint:
            raise ProtocolError(Reason.BAD_CHUNK, "chunk does not carry the signed header of its message")

    def open(self, key: Hashable, sender: Hashable, fingerprint: tuple[bytes, ...], size: int, count: int, now: float) -> None:
        """Start a message after its first chunk's signature verified."""
        lim = self.limits
        if size > lim.max_body:
            raise ProtocolError(Reason.TOO_LARGE, f"body of {size} B exceeds {lim.max_body} B")
        if count > lim.max_chunks or count > size + 1:
            raise ProtocolError(Reason.TOO_LARGE, f"{count} chunks for {size} B")
        self._check_budget(sender, SLOT_OVERHEAD)
        self._slots[key] = _Slot(sender, fingerprint, size, count, now)
        self._charge(self._slots[key], SLOT_OVERHEAD)

    def add(self, key: Hashable, index: int, part: bytes, now: float) -> bytes | None:
        """Store one chunk; return the whole body when it is complete."""
        slot = self._slots[key]
        if index >= slot.count:
            self._drop(key)
            raise ProtocolError(Reason.BAD_CHUNK, f"chunk {index} of {slot.count}")
        if index in slot.parts:
            return None  # duplicate (QoS 1 redelivery)
        n = len(part)
        if slot.held + n > slot.size:
            self._drop(key)
            raise ProtocolError(Reason.BAD_CHUNK, "chunks add up to more than the signed size")
        try:
            self._check_budget(slot.sender, n + PART_OVERHEAD)
        except ProtocolError:
            self._drop(key)
            raise
        slot.parts[index] = part
        slot.held += n
        self._charge(slot, n + PART_OVERHEAD)
        if len(slot.parts) < slot.count:
            return None
        body = b"".join(slot.parts[i] for i in range(slot.count))
        self._drop(key)
        return body

    def expire(self, now: float) -> list[Hashable]:
        """Drop messages whose first chunk is older than the timeout; return their keys."""
        old = [k for k, s in self._slots.items() if now - s.started > self.limits.timeout]
        for k in old:
            self._drop(k)
        return old

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
