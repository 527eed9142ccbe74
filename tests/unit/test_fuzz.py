"""Property tests (hypothesis) of everything that parses bytes from the network.

Guards the daemon's one-`except` contract: whatever arrives — random bytes,
COSE-shaped junk, genuinely *signed* junk from an enrolled but hostile sender,
valid messages with bytes flipped, cut, inserted or spliced, tensor maps with
inconsistent shapes and tags — `Inbox.receive`, `envelope.loads`,
`tensors.decode_state_dict`, `messages.validate` and `messages.tensors_of` raise
`ProtocolError` or return a result that is exactly what was signed and within the
configured `Limits`. Never another exception, never a hang (hypothesis deadline
plus pytest-timeout), never an allocation beyond the limits (tracemalloc on a
sample; torch's own allocations are bounded by the element limits asserted on
every decoded tensor). Example counts are modest so the file runs in seconds.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import cbor2
import pytest
import torch
from cbor2 import CBORTag
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fedmq.common import envelope, messages
from fedmq.common.chunks import ReassemblyLimits
from fedmq.common.envelope import HDR_BODY, HDR_CHUNK, PROTOCOL_VERSION, protected_header
from fedmq.common.errors import ProtocolError
from fedmq.common.keys import Identity
from fedmq.common.tensors import TYPED_ARRAY_TAGS, Limits, decode_state_dict

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
SMALL = Limits(max_elements=4096, max_total_elements=8192, max_tensors=16, max_ndim=4)
REASSEMBLY = ReassemblyLimits(max_body=64 * 1024, max_chunks=64, max_pending_per_sender=256 * 1024,
                              max_pending_total=512 * 1024, timeout=10.0)
NOW = 1_700_000_000.0


def within_limits(tensors: dict[str, torch.Tensor], limits: Limits = SMALL) -> None:
    assert len(tensors) <= limits.max_tensors
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert all(t.numel() <= limits.max_elements and t.dim() <= limits.max_ndim for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) <= limits.max_total_elements


def receive_all(wire, payloads: list[bytes], topic: str | None = None) -> list[Any]:
    """Feed payloads to a fresh inbox; the delivered messages. Only ProtocolError may escape a receive."""
    inbox = wire.inbox(reassembly=REASSEMBLY)
    out = []
    for p in payloads:
        try:
            got = inbox.receive(topic or wire.update_topic(), p, NOW)
        except ProtocolError:
            continue
        if got is not None:
            out.append(got)
    assert inbox.reassembler.pending_bytes <= REASSEMBLY.max_pending_total
    inbox.expire(NOW + REASSEMBLY.timeout + 1)
    assert inbox.reassembler.pending_bytes == 0
    return out


# ------------------------------------------------------------------ strategies

cbor_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats() | st.text(max_size=12) | st.binary(max_size=40))
any_tag = st.sampled_from([0, 1, 2, 3, 4, 5, 18, 24, 25, 28, 29, 30, 35, 36, 37, 40, 52, 54, 64, 69, 72, 81, 85,
                           100, 256, 258, 260, 261, 1004, 43000, 55799]) | st.integers(0, 2**20)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner,
                                                                  max_size=4)
                   | st.builds(CBORTag, any_tag, inner)),
    max_leaves=20,
)


def itemsize(tag: int) -> int:
    """RFC 8746: tag = 0b010_f_s_e_ll; integers are 1 << ll bytes, floats 2 << ll."""
    ll = tag & 3
    return (2 << ll) if tag & 0x10 else (1 << ll)


@st.composite
def near_valid_dense(draw: st.DrawFn) -> CBORTag:
    """tag 40 [shape, typed array] that is valid, or off by one in one respect."""
    tag = draw(st.sampled_from(sorted(TYPED_ARRAY_TAGS) + [68, 76, 83, 87, 88]))
    shape = draw(st.lists(st.integers(0, 5), max_size=5))
    n = math.prod(shape) * itemsize(tag) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    data = draw(st.binary(min_size=max(n, 0), max_size=max(n, 0)))
    weird_shape = draw(st.sampled_from([None, None, None, None, [-1], [2**63], [0, 2**62], [10**6] * 3,
                                        [1.0], "1", [True]]))
    return CBORTag(40, [shape if weird_shape is None else weird_shape, CBORTag(tag, data)])


dense_items = near_valid_dense()
tensor_items = st.recursive(
    dense_items | cbor_values,
    lambda inner: (
        st.builds(lambda d: ["bfloat16", d], dense_items)
        | st.builds(lambda shape, idx, val: {"coo": {"shape": shape, "indices": idx, "values": val}},
                    st.lists(st.integers(0, 80), max_size=3) | st.just([10**12]) | cbor_values, dense_items, inner)
        | st.builds(lambda s, z, c: {"q8": {"scale": s, "zero": z, "codes": c}},
                    st.floats() | st.integers(), st.integers(-200, 200), dense_items)
    ),
    max_leaves=4,
)
state_dicts = st.dictionaries(st.text(max_size=4) | st.integers(0, 3), tensor_items, max_size=6) | cbor_values


# ------------------------------------------------------------------ decoding arbitrary input


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_into_the_inbox(wire, data: bytes) -> None:
    assert receive_all(wire, [data]) == []


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_into_the_tensor_decoder(data: bytes) -> None:
    try:
        within_limits(decode_state_dict(envelope.loads(data), SMALL))
    except ProtocolError:
        pass


@FUZZ
@given(value=cbor_values)
def test_any_cbor_value_into_the_tensor_decoder_and_schema(value: Any) -> None:
    try:
        decoded = envelope.loads(cbor2.dumps(value))
    except ProtocolError:
        return  # e.g. a map whose keys cbor2 encodes identically (duplicate keys)
    body = decoded if isinstance(decoded, dict) else {"x": decoded}
    calls = [lambda: within_limits(decode_state_dict(decoded, SMALL)),
             lambda: within_limits(messages.tensors_of({"tensors": decoded}, SMALL))]
    calls += [lambda k=k: messages.validate(k, messages.KINDS[k].topics[0], body) for k in messages.KINDS]
    for call in calls:
        try:
            call()
        except ProtocolError:
            pass


@FUZZ
@given(sd=state_dicts)
def test_near_valid_tensor_maps(sd: Any) -> None:
    try:
        out = decode_state_dict(envelope.loads(cbor2.dumps(sd)), SMALL)
    except ProtocolError:
        return
    within_limits(out)


@settings(FUZZ, max_examples=60)
@given(sd=state_dicts)
def test_tensor_decoder_memory_stays_bounded(sd: Any) -> None:
    # Every Python/numpy allocation is bounded by the input and a small constant;
    # torch.zeros for a coo is bounded by SMALL.max_elements (asserted via within_limits).
    raw = cbor2.dumps(sd)
    tracemalloc.start()
    try:
        try:
            within_limits(decode_state_dict(envelope.loads(raw), SMALL))
        except ProtocolError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 8 * len(raw) + 8 * SMALL.max_total_elements + 512 * 1024


HOSTILE = [
    bytes.fromhex("5b7fffffffffffffff"),  # byte string claiming 2**63 bytes
    bytes.fromhex("9b00ffffffffffffff"),  # array claiming 2**56 items
    bytes.fromhex("bb00ffffffffffffff"),  # map claiming 2**56 pairs
    bytes.fromhex("d2849a7fffffff"),  # COSE_Sign1 whose first element claims 2**31 items
    bytes.fromhex("d8289a7fffffff"),  # tag 40 over a huge array
    bytes.fromhex("5f") + bytes.fromhex("5a00100000") * 4,  # indefinite string of truncated 1 MiB chunks
    b"\x9f" * 10_000,  # deep indefinite nesting
    b"\x81" * 10_000,  # deep definite nesting
    bytes.fromhex("d81c81d81d00"),  # shared reference to itself
    cbor2.dumps(CBORTag(40, [[0, 2**62], CBORTag(85, b"")])),  # empty, with an absurd dimension
    cbor2.dumps({"coo": {"shape": [10**12], "indices": CBORTag(40, [[0], CBORTag(79, b"")]),
                         "values": CBORTag(40, [[0], CBORTag(85, b"")])}}),  # densify to 4 TB
]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_claimed_sizes_allocate_nothing_of_that_size(wire, data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_state_dict(envelope.loads(data), SMALL)
        with pytest.raises(ProtocolError):
            decode_state_dict({"t": envelope.loads(data)}, SMALL)
        assert receive_all(wire, [data]) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024


# ------------------------------------------------------------------ COSE-shaped and genuinely signed junk


def as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else cbor2.dumps(v)


@FUZZ
@given(protected=cbor_values, unprotected=cbor_values, payload=cbor_values, sig=st.binary(max_size=80),
       tag=st.sampled_from([18, 18, 18, 98, 17]))
def test_cose_shaped_junk(wire, protected: Any, unprotected: Any, payload: Any, sig: bytes, tag: int) -> None:
    uh = unprotected if isinstance(unprotected, dict) else {HDR_BODY: as_bytes(unprotected)}
    data = cbor2.dumps(CBORTag(tag, [as_bytes(protected), uh, as_bytes(payload), sig]))
    assert receive_all(wire, [data]) == []


RECEIVED, OTHER = "<received topic>", "<our job>"
manifest_values = st.fixed_dictionaries(
    {"v": st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, -1]),
     "kind": st.sampled_from([*messages.KINDS, "", "bogus"]),
     "job": st.sampled_from([OTHER, OTHER, "other-job"]),
     "sender": st.sampled_from(["slave-01", "slave-01", "slave-02", ""]),
     "topic": st.sampled_from([RECEIVED, RECEIVED, "x"]),
     "seq": st.integers(-1, 2**64 - 1), "ts": st.integers(0, 2**40), "version": st.integers(0, 9),
     "round": st.integers(0, 9), "size": st.integers(-1, 2**64 - 1),
     "sha256": st.binary(min_size=31, max_size=33), "chunks": st.integers(-1, 2**20)},
    optional={"extra": cbor_values},
)


@FUZZ
@given(manifest=manifest_values | cbor_values, body=cbor_values | st.binary(max_size=200),
       chunk=st.none() | st.lists(st.integers(-2, 70), max_size=3) | cbor_values)
def test_signed_junk_from_an_enrolled_sender(wire, manifest: Any, body: Any, chunk: Any) -> None:
    # The signature is genuine: this is what a compromised slave can send.
    topic = wire.update_topic()
    if isinstance(manifest, dict) and manifest.get("topic") == RECEIVED:
        manifest = {**manifest, "topic": topic, "job": wire.inbox().job if manifest["job"] == OTHER else manifest["job"]}
    protected = protected_header(wire.slave.kid)
    payload = cbor2.dumps(manifest)
    sig = wire.sign_with(wire.slave, protected, topic, payload)
    raw_body = as_bytes(body)
    unprotected = {HDR_BODY: raw_body} if chunk is None else {HDR_BODY: raw_body, HDR_CHUNK: chunk}
    data = wire.cose(protected, unprotected, payload, sig)
    for got in receive_all(wire, [data, data]):
        # accepted only if the signed manifest really describes this body
        assert got.manifest.size == len(raw_body) == got.body_bytes
        assert got.wire_bytes == len(data)
        assert isinstance(got.body, dict)
        try:
            within_limits(messages.tensors_of(got.body, SMALL))
        except ProtocolError:
            pass


@FUZZ
@given(sd=state_dicts)
def test_signed_tensor_junk_through_the_whole_receive_path(wire, sd: Any) -> None:
    body = {**wire.update_body({}), "tensors": sd}
    try:
        payloads = wire.sealer(chunk_size=512).seal(wire.update_topic(), messages.UPDATE, body, now=NOW)
    except (TypeError, ValueError):
        assume(False)  # not encodable by cbor2 (e.g. an int key colliding); nothing to send
    (got,) = receive_all(wire, payloads)  # genuinely signed and intact: always delivered...
    try:
        messages.validate(got.kind, "update", got.body)
        within_limits(messages.tensors_of(got.body, SMALL))  # ...and its tensors decoded or refused cleanly
    except ProtocolError:
        pass


# ------------------------------------------------------------------ mutated valid messages


class Corpus:
    """Valid messages of several shapes, the topics they travel on, and what they deliver."""

    def __init__(self, wire) -> None:
        g = torch.Generator().manual_seed(3)
        newcomer = Identity.generate("newcomer")
        self.payloads = {
            "presence": [wire.sealed_presence()],
            "update": wire.sealed_update(tensors={"w": torch.randn(8, 8, generator=g)}),
            "chunked": wire.sealed_update(seq=2, tensors={"w": torch.randn(30, 30, generator=g)}, chunk_size=1024),
            "confirm": wire.sealer(newcomer).seal(wire.topics.slave("confirm", "newcomer"), messages.CONFIRM,
                                                  wire.confirm_body(newcomer), now=NOW),
        }
        self.topics = {"presence": wire.topics.slave("presence", "slave-01"), "update": wire.update_topic(),
                       "chunked": wire.update_topic(), "confirm": wire.topics.slave("confirm", "newcomer")}
        self.delivered = {name: receive_all(wire, p, self.topics[name]) for name, p in self.payloads.items()}
        assert all(len(v) == 1 for v in self.delivered.values())
        assert len(self.payloads["chunked"]) > 2
        self.donors = [p for ps in self.payloads.values() for p in ps]


@pytest.fixture(scope="module")
def corpus(wire) -> Corpus:
    return Corpus(wire)


def mutate(draw: st.DrawFn, data: bytes, donors: list[bytes]) -> bytes:
    if not data:  # an earlier mutation may have truncated everything
        return draw(st.binary(max_size=8))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "overwrite"]))
    pos = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 8)):]
    if kind == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=16))
        return data[:pos] + junk + data[pos + len(junk):]
    donor = draw(st.sampled_from(donors))  # splice: our head, another valid message's tail
    return data[:pos] + donor[draw(st.integers(0, len(donor))):]


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_valid_messages(wire, corpus: Corpus, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(corpus.payloads)))
    payloads = list(corpus.payloads[name])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(payloads) - 1))
        payloads[i] = mutate(data.draw, payloads[i], corpus.donors)
    assume(payloads != corpus.payloads[name])
    topic = corpus.topics[name]
    genuine = [(r.manifest, r.body, r.enrolled) for n, rs in corpus.delivered.items() for r in rs
               if corpus.topics[n] == topic]
    for got in receive_all(wire, payloads, topic):
        # A mutation may survive only where it leaves signed content intact (a chunk's
        # unsigned index changed on a duplicate; a splice that recreated a valid message,
        # possibly another one signed for the same topic): what is delivered is always
        # exactly something the sender signed for this topic.
        assert (got.manifest, got.body, got.enrolled) in genuine


def fields(payload: bytes) -> list[Any]:
    tag = cbor2.loads(payload)
    protected, unprotected, manifest, signature = tag.value
    return [protected, dict(unprotected), manifest, signature]


def game(draw: st.DrawFn, payload: bytes, donors: list[bytes]) -> bytes:
    """One structured change to a valid payload: a header field swapped with another
    message's, a slice replaced, a chunk header rewritten, a label re-typed."""
    f, donor = fields(payload), fields(draw(st.sampled_from(donors)))
    part, chunk = f[1][HDR_BODY], f[1].get(HDR_CHUNK)
    count = chunk[1] if chunk else 1
    kind = draw(st.sampled_from(["swap", "slice", "index", "label", "protected"]))
    if kind == "swap":  # protected header, manifest or signature of another valid message
        for i in draw(st.sets(st.sampled_from([0, 2, 3]), min_size=1)):
            f[i] = donor[i]
    elif kind == "slice":
        flipped = bytes([part[0] ^ 0xFF]) + part[1:] if part else b"\x00"
        f[1][HDR_BODY] = draw(st.sampled_from([donor[1][HDR_BODY], flipped, part[: len(part) // 2], part + part,
                                               b""]) | st.binary(max_size=64))
    elif kind == "index":
        f[1][HDR_CHUNK] = draw(st.sampled_from([[0, count], [count - 1, count], [count, count + 1], [0, 1],
                                                [0, count - 1], [-1, count], [0.0, count], [0, float(count)]])
                               | st.lists(st.integers(0, count + 1), min_size=2, max_size=2))
        if draw(st.booleans()) and chunk is not None:
            f[1].pop(HDR_CHUNK)
    elif kind == "label":  # the same labels as floats, or unknown extra labels
        key = draw(st.sampled_from([HDR_BODY, HDR_CHUNK]))
        if key in f[1]:
            f[1][float(key)] = f[1].pop(key)
        f[1][draw(st.integers(-70000, 70000) | st.text(max_size=3))] = draw(cbor_values)
    else:  # the same protected header content, other bytes
        kid = cbor2.loads(f[0])[4]
        f[0] = cbor2.dumps(draw(st.sampled_from([{4: kid, 1: -8}, {1: -8.0, 4: kid}, {1: -8, 4: kid, 5: b""},
                                                 {1.0: -8, 4: kid}])))
    return cbor2.dumps(CBORTag(envelope.COSE_SIGN1_TAG, f))


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_structured_games_with_headers_slices_and_chunk_indices(wire, corpus: Corpus, data: st.DataObject) -> None:
    # Genuine chunks (some lost, some duplicated) mixed with forgeries built from
    # them and from other valid messages, in any order. Only what was signed for this
    # topic is ever delivered, each message at most once; and when every genuine chunk
    # arrives among at most `max_spare_slices` forgeries, the message is delivered.
    topic, genuine = corpus.topics["chunked"], corpus.payloads["chunked"]
    same_topic = genuine + corpus.payloads["update"]
    forged = [game(data.draw, data.draw(st.sampled_from(same_topic)), corpus.donors)
              for _ in range(data.draw(st.integers(0, 6)))]
    lossy = data.draw(st.booleans())
    kept = [p for p in genuine if not lossy or data.draw(st.booleans())]
    dups = data.draw(st.lists(st.sampled_from(genuine), max_size=3))
    stream = data.draw(st.permutations(kept + forged + dups))
    signed = {(r.manifest, cbor2.dumps(r.body), r.enrolled) for n in ("chunked", "update")
              for r in corpus.delivered[n]}
    delivered = receive_all(wire, stream, topic)
    for got in delivered:
        assert (got.manifest, cbor2.dumps(got.body), got.enrolled) in signed
    assert len({got.manifest for got in delivered}) == len(delivered)
    event(f"delivered {len(delivered)}")
    if len(kept) == len(genuine) and len(forged) <= REASSEMBLY.max_spare_slices:
        event("liveness checked")
        (want,) = corpus.delivered["chunked"]
        (got,) = [g for g in delivered if g.manifest == want.manifest]
        assert got.body == want.body and got.wire_bytes == sum(map(len, genuine))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_valid_chunks_in_any_order_with_duplicates_deliver_once(wire, corpus: Corpus, data: st.DataObject) -> None:
    chunks = corpus.payloads["chunked"]
    order = data.draw(st.permutations(chunks))
    dups = data.draw(st.lists(st.sampled_from(chunks), max_size=4))
    got = receive_all(wire, list(order) + dups)
    assert len(got) == 1 and got[0].body == corpus.delivered["chunked"][0].body


def test_semantic_tags_stay_uninterpreted() -> None:
    # tags cbor2 would otherwise turn into e-mail messages, regexes, self-referencing
    # lists or giant ints come back as inert CBORTag objects
    for tag, value in [(36, "Subject: x\n\nbody"), (35, "(a+)+$"), (28, [CBORTag(29, 0)]), (2, b"\xff" * 4096),
                       (1, float("nan")), (258, [[1]]), (30, [1, 0])]:
        got = envelope.loads(cbor2.dumps(CBORTag(tag, value)))
        assert isinstance(got, CBORTag) and got.tag == tag
