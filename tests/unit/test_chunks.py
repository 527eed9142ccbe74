"""Chunking and bounded reassembly (common/chunks.py, and its use by `Inbox`).

Guards that a chunked message is delivered exactly once whatever the network does
(loss, duplication, reordering, interleaving), that partial messages expire, that
no sender (enrolled or not) can make the receiver hold more than the configured
budgets, and that every scenario leaves the reassembly buffers empty.
"""

from __future__ import annotations

import random

import cbor2
import pytest
import torch

from fedmq.common import messages
from fedmq.common.channel import Inbox
from fedmq.common.chunks import DEFAULT_CHUNK_SIZE, Reassembler, ReassemblyLimits, split
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
    assert inbox.expire(NOW + 30.0) == 0  # not older than the timeout yet
    assert inbox.expire(NOW + 30.5) == 1
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
    assert inbox.expire(NOW + 31) == 1
    assert drained(inbox)


def test_duplicated_chunks_deliver_the_message_once(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    doubled = [p for p in payloads[:-1] for _ in range(2)] + [payloads[-1]]
    assert len(wire.deliver(inbox, topic, doubled)) == 1
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


def test_chunks_adding_up_past_the_signed_size(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    # an on-path attacker pads chunk 1 (the body is not covered by the signature
    # itself, only by the digest checked at the end)
    padded = wire.rebuild(payloads[1], lambda f: f[1].__setitem__(HDR_BODY, f[1][HDR_BODY] * 50))
    assert reject(inbox, topic, padded) == Reason.BAD_CHUNK
    assert drained(inbox)


def test_chunk_index_beyond_the_count(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)
    inbox.receive(topic, payloads[0], NOW)
    n = len(payloads)
    bad = wire.rebuild(payloads[1], lambda f: f[1].__setitem__(HDR_CHUNK, [n + 5, n + 6]))
    assert reject(inbox, topic, bad) == Reason.BAD_CHUNK
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


def test_a_corrupted_chunk_body_fails_the_digest_and_frees_the_slot(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    payloads = wire.sealed_update(tensors=tensors(), chunk_size=CHUNK)

    def flip(f: list) -> None:
        body = bytearray(f[1][HDR_BODY])
        body[0] ^= 0xFF
        f[1][HDR_BODY] = bytes(body)

    stream = payloads[:2] + [wire.rebuild(payloads[2], flip)] + payloads[3:]
    with pytest.raises(ProtocolError) as exc:
        wire.deliver(inbox, topic, stream)
    assert exc.value.reason == Reason.DIGEST_MISMATCH
    assert drained(inbox)
    # nothing was accepted, so the genuine message may still arrive (QoS 1 redelivery)
    assert len(wire.deliver(inbox, topic, payloads)) == 1


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


# ------------------------------------------------------------------ Reassembler on its own


def fingerprint(tag: bytes = b"sig") -> tuple[bytes, ...]:
    return (b"protected", tag)


def test_reassembler_accounting_returns_to_zero() -> None:
    r = Reassembler(ReassemblyLimits())
    r.open("m1", "alice", fingerprint(), size=6, count=3, now=0.0)
    r.open("m2", "alice", fingerprint(), size=4, count=2, now=0.0)
    r.open("m3", "bob", fingerprint(), size=2, count=2, now=0.0)
    assert r.add("m1", 2, b"ef", 0.0) is None
    assert r.add("m1", 2, b"ef", 0.0) is None  # duplicate
    assert r.add("m2", 0, b"ab", 0.0) is None
    assert r.add("m3", 1, b"y", 0.0) is None
    assert r.pending_bytes > 0 and len(r) == 3
    assert r.add("m1", 0, b"ab", 0.0) is None
    assert r.add("m1", 1, b"cd", 0.0) == b"abcdef"
    assert not r.has("m1")
    with pytest.raises(ProtocolError) as exc:
        r.add("m2", 5, b"zz", 0.0)
    assert exc.value.reason == Reason.BAD_CHUNK and not r.has("m2")
    assert r.expire(1000.0) == ["m3"]
    assert r.pending_bytes == 0 and len(r) == 0


def test_reassembler_fingerprint_check() -> None:
    r = Reassembler()
    r.open("m", "alice", fingerprint(b"one"), size=2, count=2, now=0.0)
    r.check_fingerprint("m", fingerprint(b"one"))
    with pytest.raises(ProtocolError) as exc:
        r.check_fingerprint("m", fingerprint(b"two"))
    assert exc.value.reason == Reason.BAD_CHUNK
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
        r.open("m", "alice", fingerprint(), size=size, count=count, now=0.0)
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
