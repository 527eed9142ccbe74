"""Chunking and bounded reassembly (common/chunks.py, and its use by `Inbox`).

Guards that a chunked message is delivered exactly once whatever the network does
(loss, duplication, reordering, interleaving), that partial messages expire, that
no sender (enrolled or not) can make the receiver hold more than the configured
budgets, and that every scenario leaves the reassembly buffers empty.
"""

from __future__ import annotations

import hashlib
import random

import cbor2
import pytest
import torch

from fedmq.common import chunks, messages
from fedmq.common.channel import Expired, Inbox
from fedmq.common.chunks import DEFAULT_CHUNK_SIZE, Completed, Reassembler, ReassemblyLimits, max_slice, split
from fedmq.common.envelope import HDR_BODY, HDR_CHUNK, protected_header, sign
from fedmq.common.errors import ProtocolError, Reason

NOW = 1_700_000_000.0
CHUNK = 256


def tensors(seed: int = 0, n: int = 600) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g)}


def drained(inbox: Inbox) -> bool:
    return inbox.reassembler.pending_bytes == 0 and len(inbox.reassembler) == 0


def reject(inbox: Inbox, topic: str, payload: bytes, now: float = NOW) -> str:
    with pytest.raises(ProtocolError) as exc:
        inbox.receive(topic, payload, now)
    return exc.value.reason


def flip(f: list, at: int = 0) -> None:
    """`Wire.rebuild` edit: change one byte of the slice, keep the signed header (a forged chunk)."""
    body = bytearray(f[1][HDR_BODY])
    body[at % len(body)] ^= 0xFF
    f[1][HDR_BODY] = bytes(body)


class DigestCounter:
    """Stands in for `hashlib` in common/chunks.py: counts the body digests computed."""

    def __init__(self) -> None:
        self.count = 0

    def sha256(self, *args: bytes):
        self.count += 1
        return hashlib.sha256(*args)


@pytest.fixture
def digests(monkeypatch) -> DigestCounter:
    counter = DigestCounter()
    monkeypatch.setattr(chunks, "hashlib", counter)
    return counter


# ------------------------------------------------------------------ split


def test_split_sizes() -> None:
    assert split(b"") == [b""]
    assert split(b"abc", 3) == [b"abc"]
    assert split(b"abcdefg", 3) == [b"abc", b"def", b"g"]
    body = bytes(range(256)) * 1000
    parts = split(body)
    assert b"".join(parts) == body and all(len(p) == DEFAULT_CHUNK_SIZE for p in parts[:-1])
    with pytest.raises(ValueError):
        split(b"x", 0)


# ------------------------------------------------------------------ delivery under a bad network


def test_in_order_delivery_completes_on_the_last_chunk(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    assert len(payloads) > 5
    for p in payloads[:-1]:
        assert inbox.receive(topic, p, NOW) is None
    got = inbox.receive(topic, payloads[-1], NOW)
    assert torch.equal(messages.tensors_of(got.body)["w"], tensors()["w"])
    assert drained(inbox)


def test_a_missing_chunk_never_completes_and_expires(wire) -> None:
    inbox, topic = wire.inbox(reassembly=ReassemblyLimits(timeout=30.0)), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    lost = payloads[:3] + payloads[4:]
    assert wire.deliver(inbox, topic, lost) == []
    assert wire.deliver(inbox, topic, lost) == []  # redelivery of the rest does not help
    assert len(inbox.reassembler) == 1 and inbox.reassembler.pending_bytes > 0
    assert inbox.expire(NOW + 30.0) == []  # not older than the timeout yet
    n = len(payloads)
    assert inbox.expire(NOW + 30.5) == [Expired("slave-01", topic, messages.UPDATE, 1, received=n - 1, chunks=n)]
    assert drained(inbox)


def test_an_expired_message_can_still_arrive_again_in_full(wire) -> None:
    inbox, topic = wire.inbox(reassembly=ReassemblyLimits(timeout=30.0)), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    wire.deliver(inbox, topic, payloads[:-1])
    inbox.expire(NOW + 60)
    later = NOW + 61
    assert inbox.receive(topic, payloads[-1], later) is None  # opens a fresh slot
    assert len(wire.deliver(inbox, topic, payloads[:-1], now=later)) == 1
    assert drained(inbox)


def test_expiry_counts_from_the_first_chunk(wire) -> None:
    inbox, topic = wire.inbox(reassembly=ReassemblyLimits(timeout=30.0)), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    inbox.receive(topic, payloads[1], NOW + 29)  # a trickle does not keep a message alive forever
    assert [(e.sender, e.received) for e in inbox.expire(NOW + 31)] == [("slave-01", 2)]
    assert drained(inbox)


def test_duplicated_chunks_deliver_the_message_once(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    doubled = [p for p in payloads[:-1] for _ in range(2)] + [payloads[-1]]
    (got,) = wire.deliver(inbox, topic, doubled)
    assert got.wire_bytes == sum(map(len, payloads))  # each chunk once, as published
    assert got.body_bytes == got.manifest.size < got.wire_bytes
    for p in payloads:  # after completion, every late copy is a replay
        assert reject(inbox, topic, p) == Reason.REPLAY
    assert drained(inbox)


@pytest.mark.parametrize("seed", range(6))
def test_reordered_chunks_deliver_the_same_body(wire, seed: int) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(seed), chunk_size=CHUNK)
    order = payloads[:]
    random.Random(seed).shuffle(order)
    got = wire.deliver(inbox, topic, order)
    assert len(got) == 1
    assert torch.equal(messages.tensors_of(got[0].body)["w"], tensors(seed)["w"])
    assert drained(inbox)


def test_reordered_and_duplicated_with_a_late_duplicate_of_a_completed_message(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    rng = random.Random(42)
    stream = payloads + rng.sample(payloads, 4)
    rng.shuffle(stream)
    delivered, replays = 0, 0
    for p in stream:
        try:
            delivered += inbox.receive(topic, p, NOW) is not None
        except ProtocolError as exc:
            assert exc.reason == Reason.REPLAY  # a copy arriving after completion
            replays += 1
    assert delivered == 1
    assert drained(inbox)


def test_interleaved_messages_from_one_sender_on_one_topic(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    a = wire.sealed_update(seq=1, tensors=tensors(1), chunk_size=CHUNK)
    b = wire.sealed_update(seq=2, tensors=tensors(2), chunk_size=CHUNK)
    assert len(a) == len(b)
    stream = [p for pair in zip(a, b) for p in pair]  # a0 b0 a1 b1 ...: a completes first
    got = wire.deliver(inbox, topic, stream)
    assert [r.manifest.seq for r in got] == [1, 2]
    assert torch.equal(messages.tensors_of(got[1].body)["w"], tensors(2)["w"])
    assert drained(inbox)


def test_an_older_message_completing_after_a_newer_one_is_a_replay(wire) -> None:
    # Sequence numbers are strictly increasing per (sender, topic): once seq 2 is
    # accepted, seq 1 is old news even if its chunks were already on the way.
    inbox, topic = wire.inbox(), wire.update_topic()
    a = wire.sealed_update(seq=1, tensors=tensors(1), chunk_size=CHUNK)
    b = wire.sealed_update(seq=2, tensors=tensors(2), chunk_size=CHUNK)
    wire.deliver(inbox, topic, a[:-1])
    assert len(wire.deliver(inbox, topic, b)) == 1
    assert reject(inbox, topic, a[-1]) == Reason.REPLAY
    assert drained(inbox)


def test_interleaved_messages_from_different_senders(wire) -> None:
    inbox = wire.inbox()
    ta, tb = wire.update_topic(wire.slave), wire.update_topic(wire.other)
    a = wire.sealed_update(identity=wire.slave, tensors=tensors(1), chunk_size=CHUNK)
    b = wire.sealed_update(identity=wire.other, tensors=tensors(2), chunk_size=CHUNK)
    stream = [(ta, p) for p in a] + [(tb, p) for p in b]
    random.Random(7).shuffle(stream)
    got = [r for t, p in stream if (r := inbox.receive(t, p, NOW)) is not None]
    assert sorted(r.sender for r in got) == ["slave-01", "slave-02"]
    for r in got:
        want = tensors(1 if r.sender == "slave-01" else 2)["w"]
        assert torch.equal(messages.tensors_of(r.body)["w"], want)
    assert drained(inbox)


def test_the_same_message_on_two_topics_is_two_slots(wire) -> None:
    # master publishes the model on .../model and .../to/SLAVE: separately signed,
    # separately reassembled
    inbox = wire.inbox()
    sealer = wire.sealer(wire.master, chunk_size=CHUNK)
    body = {"tensors": {"w": cbor2.loads(cbor2.dumps(wire.update_body(tensors())["tensors"]["w"]))}}
    t1, t2 = wire.topics.master("model"), wire.topics.direct("slave-01")
    p1, p2 = sealer.seal(t1, messages.MODEL, body, now=NOW), sealer.seal(t2, messages.MODEL, body, now=NOW)
    stream = [x for pair in zip([(t1, p) for p in p1], [(t2, p) for p in p2]) for x in pair]
    got = [r for t, p in stream if (r := inbox.receive(t, p, NOW)) is not None]
    assert [r.topic for r in got] == [t1, t2]
    assert drained(inbox)


# ------------------------------------------------------------------ memory exhaustion attempts


def test_per_sender_budget(wire) -> None:
    limits = ReassemblyLimits(max_pending_per_sender=8 * 1024)
    inbox, topic = wire.inbox(reassembly=limits), wire.update_topic()
    big = wire.sealed_update(tensors=tensors(n=4000), chunk_size=1024)  # ~16 kB body
    reasons = []
    for p in big:
        try:
            inbox.receive(topic, p, NOW)
        except ProtocolError as exc:
            reasons.append(exc.reason)
        assert inbox.reassembler.pending_bytes <= limits.max_pending_per_sender
    assert reasons and reasons[0] == Reason.TOO_LARGE
    # the slot was dropped; the chunks after the cut reopen nothing that can complete
    inbox.expire(NOW + limits.timeout + 1)
    assert drained(inbox)
    # another sender is not affected by slave-01's budget
    other = wire.sealed_update(identity=wire.other, tensors=tensors(n=600), chunk_size=1024)
    assert len(wire.deliver(inbox, wire.update_topic(wire.other), other)) == 1
    assert drained(inbox)


def test_per_sender_budget_spans_concurrent_messages(wire) -> None:
    limits = ReassemblyLimits(max_pending_per_sender=12 * 1024)
    inbox, topic = wire.inbox(reassembly=limits), wire.update_topic()
    a = wire.sealed_update(seq=1, tensors=tensors(1, n=2000), chunk_size=1024)  # ~8 kB each
    b = wire.sealed_update(seq=2, tensors=tensors(2, n=2000), chunk_size=1024)
    wire.deliver(inbox, topic, a[:-1])  # a holds ~7 kB
    with pytest.raises(ProtocolError) as exc:
        wire.deliver(inbox, topic, b[:-1])  # b would push slave-01 past 12 kB
    assert exc.value.reason == Reason.TOO_LARGE
    assert len(wire.deliver(inbox, topic, a[-1:])) == 1  # a is unharmed
    assert drained(inbox)


def test_total_budget(wire) -> None:
    limits = ReassemblyLimits(max_pending_per_sender=16 * 1024, max_pending_total=20 * 1024)
    inbox = wire.inbox(reassembly=limits)
    a = wire.sealed_update(identity=wire.slave, tensors=tensors(1, n=2500), chunk_size=1024)  # ~10 kB
    b = wire.sealed_update(identity=wire.other, tensors=tensors(2, n=2500), chunk_size=1024)
    wire.deliver(inbox, wire.update_topic(wire.slave), a[:-1])
    with pytest.raises(ProtocolError) as exc:
        wire.deliver(inbox, wire.update_topic(wire.other), b[:-1])
    assert exc.value.reason == Reason.TOO_LARGE
    assert inbox.reassembler.pending_bytes <= limits.max_pending_total
    assert len(wire.deliver(inbox, wire.update_topic(wire.slave), a[-1:])) == 1
    assert drained(inbox)


def test_claimed_size_beyond_max_body_is_refused_at_the_first_chunk(wire) -> None:
    inbox, topic = wire.inbox(reassembly=ReassemblyLimits(max_body=4096)), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(n=2000), chunk_size=1024)
    for p in payloads:  # every chunk, in whatever order, is refused without being stored
        assert reject(inbox, topic, p) == Reason.TOO_LARGE
        assert drained(inbox)


def test_claimed_chunk_count_beyond_max_chunks(wire) -> None:
    inbox, topic = wire.inbox(reassembly=ReassemblyLimits(max_chunks=8)), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(n=600), chunk_size=CHUNK)
    assert len(payloads) > 8
    assert reject(inbox, topic, payloads[0]) == Reason.TOO_LARGE
    assert drained(inbox)


def test_more_chunks_than_body_bytes_is_refused(wire) -> None:
    # a signed manifest claiming 1000 chunks for a 10-byte body (each chunk costs
    # bookkeeping although it holds nothing)
    topic = wire.update_topic()
    body = cbor2.dumps({"k": "123456"})
    manifest = wire.manifest(wire.slave, topic, body, chunks=1000)
    parts = [body] + [b""] * 999
    payloads = sign(wire.slave, topic, manifest, parts)
    inbox = wire.inbox()
    assert reject(inbox, topic, payloads[0]) == Reason.TOO_LARGE
    assert drained(inbox)


def test_a_slice_longer_than_any_conforming_split_allows(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    # an on-path attacker pads chunk 1 (the body is not covered by the signature
    # itself, only by the digest checked at the end): refused, and, being
    # unauthenticated, it does not cancel the partial message
    padded = wire.rebuild(payloads[1], lambda f: f[1].__setitem__(HDR_BODY, f[1][HDR_BODY] * 50))
    assert reject(inbox, topic, padded) == Reason.BAD_CHUNK
    assert len(wire.deliver(inbox, topic, payloads[1:])) == 1
    assert drained(inbox)


@pytest.mark.parametrize("header", ["beyond", "other-count", "none"])
def test_a_further_chunk_with_another_chunk_count_is_refused_without_cancelling(wire, header: str) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    n = len(payloads)

    def edit(f: list) -> None:
        if header == "none":  # read as "index 0" before, which shadowed the genuine chunk 0
            f[1].pop(HDR_CHUNK)
        else:
            f[1][HDR_CHUNK] = [n + 5, n + 6] if header == "beyond" else [0, n - 1]

    assert reject(inbox, topic, wire.rebuild(payloads[1], edit)) == Reason.BAD_CHUNK
    assert len(wire.deliver(inbox, topic, payloads[1:])) == 1  # the genuine chunks still complete it
    assert drained(inbox)


@pytest.mark.parametrize("what", ["signature", "protected"])
def test_chunk_whose_signed_header_differs_from_the_first(wire, what: str) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)

    def edit(f: list) -> None:
        if what == "signature":
            f[3] = bytes(64)
        else:  # same header content, other encoding (alg and kid swapped): other bytes
            f[0] = cbor2.dumps({4: wire.slave.kid, 1: -8})

    assert reject(inbox, topic, wire.rebuild(payloads[1], edit)) == Reason.BAD_CHUNK
    assert len(wire.deliver(inbox, topic, payloads[1:])) == 1  # the genuine chunks still complete
    assert drained(inbox)


def test_a_corrupted_chunk_body_fails_the_digest_and_the_genuine_slice_still_completes(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    stream = payloads[:2] + [wire.rebuild(payloads[2], flip)] + payloads[3:]
    with pytest.raises(ProtocolError) as exc:
        wire.deliver(inbox, topic, stream)
    assert exc.value.reason == Reason.DIGEST_MISMATCH
    # nothing was accepted, so the genuine message may still arrive (QoS 1 redelivery):
    # its chunk 2 is a second candidate (the earlier chunks are duplicates) and completes it
    got = wire.deliver(inbox, topic, payloads[:3])
    assert len(got) == 1 and got[0].wire_bytes == sum(map(len, payloads))
    assert drained(inbox)


def test_unauthenticated_chunks_open_nothing(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    forged = [wire.rebuild(p, lambda f: f.__setitem__(3, bytes(64))) for p in payloads]
    for p in forged:
        assert reject(inbox, topic, p) == Reason.BAD_SIGNATURE
    assert drained(inbox)


def test_many_partial_messages_with_tiny_chunks_stay_within_the_sender_budget(wire) -> None:
    # An enrolled but hostile sender opens message after message and sends only the
    # first 1-byte chunk of each. The bookkeeping of every partial message (its key,
    # signed header and chunk table, ~1 kB in CPython) must count against the budget,
    # or a 64 kB budget would let it pin megabytes.
    limits = ReassemblyLimits(max_pending_per_sender=64 * 1024)
    inbox, topic = wire.inbox(reassembly=limits), wire.update_topic()
    sealer = wire.sealer(chunk_size=1)
    opened = 0
    for _ in range(2000):
        first = sealer.seal_raw(topic, messages.PRESENCE, b"\xa0\xa0", now=NOW)[0]
        try:
            inbox.receive(topic, first, NOW)
        except ProtocolError as exc:
            assert exc.reason == Reason.TOO_LARGE
            break
        opened += 1
    assert opened * 1024 <= limits.max_pending_per_sender
    assert inbox.reassembler.pending_bytes <= limits.max_pending_per_sender
    inbox.expire(NOW + limits.timeout + 1)
    assert drained(inbox)


def test_one_message_of_tiny_chunks_is_charged_per_chunk(wire) -> None:
    # 1-byte chunks cost ~100 bytes each in a Python dict: charged, not just the byte.
    limits = ReassemblyLimits(max_pending_per_sender=16 * 1024)
    inbox, topic = wire.inbox(reassembly=limits), wire.update_topic()
    payloads = wire.sealer(chunk_size=1).seal_raw(topic, messages.PRESENCE, cbor2.dumps({"x": "y" * 2000}), now=NOW)
    with pytest.raises(ProtocolError) as exc:
        wire.deliver(inbox, topic, payloads)
    assert exc.value.reason == Reason.TOO_LARGE
    assert drained(inbox)




# ------------------------------------------------------------------ forged slices under a genuine header


def test_a_forged_chunk_arriving_first_does_not_poison_the_genuine_message(wire) -> None:
    # Issue 11.9: anyone who reads chunk 1 on the broker and may publish on the topic
    # sends it back with another slice. Its header is genuine, so it verifies and
    # opens the message; the genuine chunk 1 used to be dropped as a "duplicate",
    # and the genuine message failed its digest.
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    forged = wire.rebuild(payloads[1], flip)
    assert inbox.receive(topic, forged, NOW) is None
    got = wire.deliver(inbox, topic, payloads)
    assert len(got) == 1 and torch.equal(messages.tensors_of(got[0].body)["w"], tensors()["w"])
    assert got[0].wire_bytes == sum(map(len, payloads))  # the forged chunk is not counted
    assert drained(inbox)


def test_a_forged_last_chunk_fails_the_digest_but_the_genuine_one_still_completes(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    wire.deliver(inbox, topic, payloads[:-1])
    assert reject(inbox, topic, wire.rebuild(payloads[-1], flip)) == Reason.DIGEST_MISMATCH
    assert len(wire.deliver(inbox, topic, payloads[-1:])) == 1
    assert drained(inbox)


@pytest.mark.parametrize("seed", range(4))
def test_forged_slices_interleaved_with_the_genuine_ones(wire, seed: int) -> None:
    # up to max_spare_slices forgeries, anywhere, in any order: always delivered once
    rng = random.Random(seed)
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(seed), chunk_size=CHUNK)
    spares = ReassemblyLimits().max_spare_slices
    forged = [wire.rebuild(payloads[rng.randrange(len(payloads))], lambda f: flip(f, rng.randrange(CHUNK)))
              for _ in range(spares)]
    stream = payloads + forged
    rng.shuffle(stream)
    delivered = []
    for p in stream:
        try:
            got = inbox.receive(topic, p, NOW)
        except ProtocolError as exc:
            assert exc.reason in (Reason.DIGEST_MISMATCH, Reason.REPLAY)  # REPLAY: a forgery after completion
            continue
        if got is not None:
            delivered.append(got)
    assert len(delivered) == 1 and torch.equal(messages.tensors_of(delivered[0].body)["w"], tensors(seed)["w"])
    assert drained(inbox)


def test_a_flood_of_forged_slices_after_the_genuine_one_is_refused_and_harmless(wire, digests) -> None:
    limits = ReassemblyLimits()
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    spares = limits.max_spare_slices
    kept, refused = [], []
    for i in range(200):  # 200 distinct forged slices for index 0
        forged = wire.rebuild(payloads[0], lambda f, i=i: flip(f, i))
        try:
            kept.append(inbox.receive(topic, forged, NOW))
        except ProtocolError as exc:
            refused.append(exc.reason)
    assert kept == [None] * spares and refused == [Reason.TOO_LARGE] * (200 - spares)
    held = inbox.reassembler.pending_bytes
    assert held <= chunks.SLOT_OVERHEAD + (1 + spares) * (CHUNK + chunks.PART_OVERHEAD)
    (got,) = wire.deliver(inbox, topic, payloads[1:])
    assert got.wire_bytes == sum(map(len, payloads))
    assert digests.count <= 1 + spares  # the genuine slice is one of 4 candidates at index 0
    assert drained(inbox)


def test_forged_slices_at_every_index_first_cost_a_bounded_number_of_digests(wire, digests) -> None:
    # The worst case: the attacker is first at every index, so every genuine slice
    # is a spare. The genuine message is lost (beyond the bound a forger wins, as
    # one who floods the topic would), but the work is bounded: 2 ** spares digests
    # over the partial message's whole life, then it is dropped.
    limits = ReassemblyLimits()
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    assert len(payloads) > limits.max_spare_slices + 1
    reasons = []
    for p in [wire.rebuild(p, flip) for p in payloads] + payloads:
        try:
            assert inbox.receive(topic, p, NOW) is None
        except ProtocolError as exc:
            reasons.append(exc.reason)
        assert inbox.reassembler.pending_bytes <= 2 * sum(map(len, payloads))
    assert set(reasons) == {Reason.DIGEST_MISMATCH}
    assert digests.count == 2 ** limits.max_spare_slices  # 1 + 1 + 2 + 4: each combination once
    # the genuine chunks past the bound opened a new partial message that cannot complete
    assert [e.received for e in inbox.expire(NOW + limits.timeout + 1)] == [len(payloads) - limits.max_spare_slices]
    assert drained(inbox)


# ------------------------------------------------------------------ Reassembler on its own


def fingerprint(tag: bytes = b"sig") -> tuple[bytes, ...]:
    return (b"protected", tag)


def open_slot(r: Reassembler, key: str, sender: str, body: bytes, count: int, now: float = 0.0) -> None:
    r.open(key, sender, fingerprint(), size=len(body), count=count, sha256=hashlib.sha256(body).digest(), now=now)


def test_reassembler_accounting_returns_to_zero() -> None:
    r = Reassembler(ReassemblyLimits())
    open_slot(r, "m1", "alice", b"abcdef", 3)
    open_slot(r, "m2", "alice", b"abcd", 2)
    open_slot(r, "m3", "bob", b"xy", 2)
    assert r.add("m1", 2, b"ef", 0.0, 12) is None
    assert r.add("m1", 2, b"ef", 0.0, 12) is None  # duplicate
    assert r.add("m2", 0, b"ab", 0.0, 12) is None
    assert r.add("m3", 1, b"y", 0.0, 11) is None
    assert r.pending_bytes > 0 and len(r) == 3
    assert r.add("m1", 0, b"ab", 0.0, 12) is None
    assert r.add("m1", 1, b"cd", 0.0, 12) == Completed(b"abcdef", 36)
    assert not r.has("m1")
    with pytest.raises(ProtocolError) as exc:
        r.add("m2", 5, b"zz", 0.0, 12)
    assert exc.value.reason == Reason.BAD_CHUNK and r.has("m2")  # refused; the message is kept
    assert sorted(r.expire(1000.0)) == [("m2", 1), ("m3", 1)]
    assert r.pending_bytes == 0 and len(r) == 0


def test_reassembler_tries_each_combination_of_candidates_once(digests) -> None:
    r = Reassembler(ReassemblyLimits(max_spare_slices=3))
    open_slot(r, "m", "alice", b"abcdef", 3)
    assert r.add("m", 0, b"XX", 0.0, 1) is None  # forged, first at index 0
    assert r.add("m", 1, b"YY", 0.0, 1) is None  # forged, first at index 1
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 2, b"ef", 0.0, 10)  # complete: XX YY ef
    assert exc.value.reason == Reason.DIGEST_MISMATCH and digests.count == 1
    with pytest.raises(ProtocolError):
        r.add("m", 0, b"ab", 0.0, 10)  # ab YY ef only: XX YY ef was tried
    assert digests.count == 2
    assert r.add("m", 1, b"cd", 0.0, 10) == Completed(b"abcdef", 30)  # XX cd ef, then ab cd ef
    assert digests.count == 4 and r.pending_bytes == 0


def test_reassembler_hashes_only_combinations_of_the_signed_size(digests) -> None:
    r = Reassembler(ReassemblyLimits(max_spare_slices=3))
    open_slot(r, "m", "alice", b"abcdef", 3)
    r.add("m", 0, b"a", 0.0, 1)  # too short to be part of a 6-byte body with cd/ef
    r.add("m", 1, b"cd", 0.0, 1)
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 2, b"ef", 0.0, 1)
    assert exc.value.reason == Reason.SIZE_MISMATCH and digests.count == 0 and r.has("m")
    assert r.add("m", 0, b"ab", 0.0, 1).body == b"abcdef" and digests.count == 1


def test_reassembler_bounds_spares_and_drops_a_message_with_nothing_left_to_try() -> None:
    r = Reassembler(ReassemblyLimits(max_spare_slices=2))
    open_slot(r, "m", "alice", b"abcdef", 3)
    for forged in (b"X1", b"X2", b"X3"):
        r.add("m", 0, forged, 0.0, 1)  # the first, then two spares
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 0, b"ab", 0.0, 1)
    assert exc.value.reason == Reason.TOO_LARGE and r.has("m")
    r.add("m", 1, b"cd", 0.0, 1)
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 2, b"ef", 0.0, 1)
    assert exc.value.reason == Reason.DIGEST_MISMATCH and not r.has("m")  # no spare may come: dropped
    assert r.pending_bytes == 0


def test_reassembler_refuses_a_spare_beyond_the_budget_but_keeps_the_message() -> None:
    limits = ReassemblyLimits(max_pending_per_sender=chunks.SLOT_OVERHEAD + 2 * (3 + chunks.PART_OVERHEAD))
    r = Reassembler(limits)
    open_slot(r, "m", "alice", b"abcdef", 2)
    r.add("m", 0, b"abc", 0.0, 1)
    r.add("m", 0, b"XYZ", 0.0, 1)  # fills the budget
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 0, b"QRS", 0.0, 1)
    assert exc.value.reason == Reason.TOO_LARGE and r.has("m")
    with pytest.raises(ProtocolError) as exc:
        r.add("m", 1, b"def", 0.0, 1)  # a first slice that does not fit: can never complete
    assert exc.value.reason == Reason.TOO_LARGE and not r.has("m") and r.pending_bytes == 0


@pytest.mark.parametrize(("size", "count", "longest"), [(10, 3, 4), (12, 3, 5), (8, 2, 7), (5, 1, 5), (2, 3, 0)])
def test_max_slice_is_the_longest_slice_a_conforming_split_produces(size: int, count: int, longest: int) -> None:
    assert max_slice(size, count) == longest
    for c in range(1, size + 1):  # every chunk size that yields `count` slices
        parts = split(bytes(size), c)
        if len(parts) == count:
            assert max(map(len, parts)) <= longest


def test_reassembler_chunk_check() -> None:
    r = Reassembler()
    open_slot(r, "m", "alice", b"ab", 2)
    r.check_chunk("m", fingerprint(), (1, 2))
    for fp, chunk in [(fingerprint(b"two"), (1, 2)), (fingerprint(), (1, 3)), (fingerprint(), None)]:
        with pytest.raises(ProtocolError) as exc:
            r.check_chunk("m", fp, chunk)
        assert exc.value.reason == Reason.BAD_CHUNK and r.has("m")
    r.expire(1e9)
    assert r.pending_bytes == 0


@pytest.mark.parametrize(("size", "count", "limits"), [
    (10**12, 2, ReassemblyLimits()),
    (100, 20_000, ReassemblyLimits()),
    (5, 7, ReassemblyLimits()),
    (100, 2, ReassemblyLimits(max_body=99)),
])
def test_reassembler_refuses_impossible_claims(size: int, count: int, limits: ReassemblyLimits) -> None:
    r = Reassembler(limits)
    with pytest.raises(ProtocolError) as exc:
        r.open("m", "alice", fingerprint(), size=size, count=count, sha256=bytes(32), now=0.0)
    assert exc.value.reason == Reason.TOO_LARGE
    assert r.pending_bytes == 0 and len(r) == 0


def test_signed_first_chunk_claiming_a_huge_body(wire) -> None:
    topic = wire.update_topic()
    manifest = wire.manifest(wire.slave, topic, b"", size=10**12, chunks=2)
    first = sign(wire.slave, topic, manifest, [b"x", b"y"])[0]
    inbox = wire.inbox()
    assert reject(inbox, topic, first) == Reason.TOO_LARGE
    assert drained(inbox)
    assert protected_header(wire.slave.kid) == wire.fields(first)[0]
