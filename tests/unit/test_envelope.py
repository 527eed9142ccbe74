"""The signed envelope and the receiving end (common/envelope.py, common/channel.py).

Guards every rejection reason of `Inbox.receive` with its own test, that tampering
with any single byte of a valid message is detected (and only ever as
`ProtocolError`), the self-signed enrollment path, and the replay state that the
master carries across restarts in its checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import cbor2
import pytest
from cbor2 import CBORTag

from fedmq.common import envelope, messages
from fedmq.common.channel import Inbox, initial_seq
from fedmq.common.envelope import HDR_BODY, HDR_CHUNK, Manifest, protected_header, sign
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.keys import Identity, KeyRing

NOW = 1_700_000_000.0


def rejected(inbox: Inbox, topic: str, payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        inbox.receive(topic, payload, NOW)
    return exc.value


# ------------------------------------------------------------------ the honest path


def test_sealed_update_is_received_with_its_manifest_and_body(wire) -> None:
    inbox = wire.inbox()
    topic = wire.update_topic()
    (payload,) = wire.sealed_update(seq=7)
    got = inbox.receive(topic, payload, NOW)
    assert got is not None and got.enrolled
    assert (got.kind, got.sender, got.topic) == (messages.UPDATE, "slave-01", topic)
    m = got.manifest
    assert (m.job, m.seq, m.version, m.round, m.chunks, m.v) == ("job-1", 7, 1, 1, 1, envelope.PROTOCOL_VERSION)
    assert m.size == got.body_bytes == len(got.raw) and m.ts == int(NOW * 1000)
    assert got.wire_bytes == len(payload)  # one publish: the whole envelope
    messages.validate(got.kind, "update", got.body)
    tensors = messages.tensors_of(got.body)
    assert set(tensors) == {"w", "b"} and tensors["w"].shape == (4, 3)


def test_sealer_numbers_messages_upwards_and_initial_seq_survives_a_lost_state_file(wire) -> None:
    sealer = wire.sealer(seq=initial_seq(NOW))
    topic = wire.update_topic()
    inbox = wire.inbox()
    seqs = [inbox.receive(topic, sealer.seal(topic, messages.PRESENCE, {}, now=NOW)[0], NOW).manifest.seq
            for _ in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert initial_seq(NOW + 1) > seqs[-1]  # a restart a second later, state file lost
    assert initial_seq(NOW - 3600, persisted=seqs[-1]) == seqs[-1] + 1  # clock set back


# ------------------------------------------------------------------ one test per reason


def test_bad_signature(wire) -> None:
    (payload,) = wire.sealed_update()
    forged = wire.rebuild(payload, lambda f: f.__setitem__(3, bytes(64)))
    assert rejected(wire.inbox(), wire.update_topic(), forged).reason == Reason.BAD_SIGNATURE


def test_signature_by_another_key_under_the_senders_kid(wire) -> None:
    (payload,) = wire.sealed_update()

    def resign(f: list) -> None:
        f[3] = wire.sign_with(wire.other, f[0], wire.update_topic(), f[2])  # kid still says slave-01

    assert rejected(wire.inbox(), wire.update_topic(), wire.rebuild(payload, resign)).reason == Reason.BAD_SIGNATURE


def test_unknown_kid(wire) -> None:
    stranger = Identity.generate("slave-01")
    (payload,) = wire.sealed_update(identity=stranger)
    err = rejected(wire.inbox(), wire.update_topic(), payload)
    assert err.reason == Reason.UNKNOWN_KID and stranger.kid.hex() in err.detail


def test_wrong_topic(wire) -> None:
    (payload,) = wire.sealed_update()  # signed for .../update/slave-01
    err = rejected(wire.inbox(), wire.update_topic(wire.other), payload)
    assert err.reason == Reason.WRONG_TOPIC


def test_signature_for_neither_the_received_nor_the_claimed_topic_is_a_bad_signature(wire) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    manifest = wire.manifest(wire.slave, topic, body)
    (payload,) = sign(wire.slave, "fedmq/job-1/elsewhere", manifest, [body])
    assert rejected(wire.inbox(), topic, payload).reason == Reason.BAD_SIGNATURE


def test_wrong_job(wire) -> None:
    (payload,) = wire.sealed_update(job="job-2")
    assert rejected(wire.inbox(), wire.update_topic(), payload).reason == Reason.WRONG_JOB


def test_wrong_sender(wire) -> None:
    impostor = Identity("slave-02", wire.slave.private_key)  # slave-01's key, slave-02's name
    topic = wire.update_topic(wire.other)
    (payload,) = wire.sealed_update(identity=impostor, topic=topic)
    err = rejected(wire.inbox(), topic, payload)
    assert err.reason == Reason.WRONG_SENDER and "slave-01" in err.detail


def test_replay_of_the_same_payload(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    (payload,) = wire.sealed_update(seq=5)
    assert inbox.receive(topic, payload, NOW) is not None
    assert rejected(inbox, topic, payload).reason == Reason.REPLAY


def test_replay_of_a_new_message_with_the_same_seq(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    inbox.receive(topic, wire.sealed_update(seq=5)[0], NOW)
    other_body = wire.sealer(seq=5).seal(topic, messages.PRESENCE, {"state": "online", "version": 2}, now=NOW)[0]
    assert rejected(inbox, topic, other_body).reason == Reason.REPLAY


def test_replay_of_a_lower_seq(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    inbox.receive(topic, wire.sealed_update(seq=5)[0], NOW)
    assert rejected(inbox, topic, wire.sealed_update(seq=4)[0]).reason == Reason.REPLAY
    assert inbox.receive(topic, wire.sealed_update(seq=6)[0], NOW) is not None


def test_a_retained_redelivery_may_repeat_the_last_seq_but_never_go_below(wire) -> None:
    # The broker hands the current retained message to every new subscription: the
    # same (already accepted) message again is not an attack, an older one is.
    inbox, topic = wire.inbox(), wire.topics.master("model")
    sealer = wire.sealer(wire.master, seq=5)
    (m5,) = sealer.seal(topic, messages.MODEL, {"tensors": {}}, now=NOW)
    (m6,) = sealer.seal(topic, messages.MODEL, {"tensors": {}}, now=NOW)
    assert inbox.receive(topic, m5, NOW, retained=True) is not None
    assert inbox.receive(topic, m5, NOW, retained=True).manifest.seq == 5
    assert rejected(inbox, topic, m5).reason == Reason.REPLAY  # not flagged retained: a replay
    assert inbox.receive(topic, m6, NOW) is not None
    with pytest.raises(ProtocolError) as exc:
        inbox.receive(topic, m5, NOW, retained=True)
    assert exc.value.reason == Reason.REPLAY


def test_sequence_numbers_are_per_sender_and_per_topic(wire) -> None:
    inbox = wire.inbox()
    inbox.receive(wire.update_topic(), wire.sealed_update(seq=5)[0], NOW)
    # another sender, and the same sender on another topic, start their own counts
    assert inbox.receive(wire.update_topic(wire.other), wire.sealed_update(seq=1, identity=wire.other)[0], NOW)
    assert inbox.receive(wire.topics.slave("presence", "slave-01"), wire.sealed_presence(seq=1), NOW)


def test_digest_mismatch(wire) -> None:
    (payload,) = wire.sealed_update()

    def swap(f: list) -> None:
        body = bytearray(f[1][HDR_BODY])
        body[-1] ^= 1
        f[1][HDR_BODY] = bytes(body)

    assert rejected(wire.inbox(), wire.update_topic(), wire.rebuild(payload, swap)).reason == Reason.DIGEST_MISMATCH


def test_size_mismatch_of_a_swapped_body(wire) -> None:
    (payload,) = wire.sealed_update()
    longer = wire.rebuild(payload, lambda f: f[1].__setitem__(HDR_BODY, f[1][HDR_BODY] + b"\x00"))
    assert rejected(wire.inbox(), wire.update_topic(), longer).reason == Reason.SIZE_MISMATCH


def test_size_mismatch_in_a_genuinely_signed_manifest(wire) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps(wire.update_body())
    manifest = wire.manifest(wire.slave, topic, body, size=len(body) + 1)  # digest right, size wrong
    (payload,) = sign(wire.slave, topic, manifest, [body])
    assert rejected(wire.inbox(), topic, payload).reason == Reason.SIZE_MISMATCH


def test_unknown_protocol_version(wire) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    (payload,) = sign(wire.slave, topic, wire.manifest(wire.slave, topic, body, v=2), [body])
    err = rejected(wire.inbox(), topic, payload)
    assert err.reason == Reason.BAD_VERSION and "2" in err.detail


@pytest.mark.parametrize("header", [{1: -7}, {1: -19}, {1: "EdDSA"}, {}], ids=["ES256", "Ed25519-alg", "text", "none"])
def test_unsupported_alg(wire, header: dict) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    payload_m = wire.manifest(wire.slave, topic, body).encode()
    protected = cbor2.dumps({**header, 4: wire.slave.kid})
    sig = wire.sign_with(wire.slave, protected, topic, payload_m)  # a real signature: only alg is wrong
    msg = wire.cose(protected, {HDR_BODY: body}, payload_m, sig)
    assert rejected(wire.inbox(), topic, msg).reason == Reason.UNSUPPORTED_ALG


def signed_with_protected(wire, protected: bytes, chunks: int = 1) -> tuple[str, bytes, bytes, bytes]:
    """(topic, manifest bytes, a genuine signature over them and any protected header bytes, body)."""
    topic = wire.update_topic()
    body = cbor2.dumps({})
    m = wire.manifest(wire.slave, topic, body, chunks=chunks).encode()
    return topic, m, wire.sign_with(wire.slave, protected, topic, m), body


@pytest.mark.parametrize("header", [{1: -8.0}, {1.0: -8}, {True: -8}],
                         ids=["alg-float", "label-float", "label-bool"])
def test_alg_must_be_the_integer_minus_8_under_the_integer_label_1(wire, header: dict) -> None:
    # -8.0 == -8 and 1.0 == True == 1 in Python (and as dict keys): a lax check
    # accepted a header no other COSE implementation would read as EdDSA.
    protected = cbor2.dumps({**header, 4: wire.slave.kid})
    topic, m, sig, body = signed_with_protected(wire, protected)
    msg = wire.cose(protected, {HDR_BODY: body}, m, sig)
    assert rejected(wire.inbox(), topic, msg).reason == Reason.UNSUPPORTED_ALG


def test_kid_under_a_float_label_is_no_kid(wire) -> None:
    protected = cbor2.dumps({1: -8, 4.0: wire.slave.kid})
    topic, m, sig, body = signed_with_protected(wire, protected)
    assert rejected(wire.inbox(), topic, wire.cose(protected, {HDR_BODY: body}, m, sig)).reason == Reason.MALFORMED


def test_body_and_chunk_under_float_labels_are_not_read(wire) -> None:
    protected = protected_header(wire.slave.kid)
    topic, m, sig, body = signed_with_protected(wire, protected)
    msg = wire.cose(protected, {float(HDR_BODY): body}, m, sig)
    assert rejected(wire.inbox(), topic, msg).reason == Reason.MALFORMED
    topic, m2, sig2, _ = signed_with_protected(wire, protected, chunks=2)
    msg = wire.cose(protected, {HDR_BODY: body[:0], float(HDR_CHUNK): [0, 2]}, m2, sig2)
    assert rejected(wire.inbox(), topic, msg).reason == Reason.BAD_CHUNK  # no chunk header: disagrees with 2


@pytest.mark.parametrize("chunk", [[0.0, 2], [0, 2.0], [False, 2], [0, True]])
def test_chunk_header_numbers_must_be_integers(wire, chunk: list) -> None:
    (payload,) = wire.sealed_update()
    msg = wire.rebuild(payload, lambda f: f[1].__setitem__(HDR_CHUNK, chunk))
    assert rejected(wire.inbox(), wire.update_topic(), msg).reason == Reason.BAD_CHUNK


@pytest.mark.parametrize("field", ["seq", "ts", "version", "round", "size", "chunks"])
@pytest.mark.parametrize("make", [float, bool], ids=["float", "bool"])
def test_integer_manifest_fields_refuse_floats_and_booleans(wire, field: str, make) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    raw = wire.manifest(wire.slave, topic, body).__dict__
    m = cbor2.dumps(raw | {field: make(raw[field])})
    protected = protected_header(wire.slave.kid)
    msg = wire.cose(protected, {HDR_BODY: body}, m, wire.sign_with(wire.slave, protected, topic, m))
    assert rejected(wire.inbox(), topic, msg).reason == Reason.MALFORMED


@pytest.mark.parametrize("v", [1.0, True, "1"], ids=["float", "bool", "text"])
def test_the_version_must_be_the_integer_1(wire, v) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    m = cbor2.dumps(wire.manifest(wire.slave, topic, body).__dict__ | {"v": v})
    protected = protected_header(wire.slave.kid)
    msg = wire.cose(protected, {HDR_BODY: body}, m, wire.sign_with(wire.slave, protected, topic, m))
    assert rejected(wire.inbox(), topic, msg).reason == Reason.BAD_VERSION


def test_a_body_that_is_not_a_map_is_bad_body(wire) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps([1, 2, 3])
    (payload,) = sign(wire.slave, topic, wire.manifest(wire.slave, topic, body), [body])
    assert rejected(wire.inbox(), topic, payload).reason == Reason.BAD_BODY


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x9f", b"\xd2", b"\xd2\x84\x40", "text", None, 5],
                         ids=["empty", "break", "open-array", "bare-tag", "truncated", "str", "none", "int"])
def test_malformed_cbor(wire, data) -> None:
    assert rejected(wire.inbox(), wire.update_topic(), data).reason == Reason.MALFORMED


def test_truncated_message_is_malformed(wire) -> None:
    (payload,) = wire.sealed_update()
    for cut in (1, 10, len(payload) // 2, len(payload) - 1):
        assert rejected(wire.inbox(), wire.update_topic(), payload[:cut]).reason == Reason.MALFORMED


def test_not_tag_18(wire) -> None:
    (payload,) = wire.sealed_update()
    protected, unprotected, manifest, sig = wire.fields(payload)
    inbox, topic = wire.inbox(), wire.update_topic()
    for other in (cbor2.dumps([protected, unprotected, manifest, sig]),  # untagged
                  cbor2.dumps(CBORTag(98, [protected, unprotected, manifest, sig])),  # COSE_Sign
                  cbor2.dumps(CBORTag(17, [protected, unprotected, manifest, sig]))):  # COSE_Mac0
        assert rejected(inbox, topic, other).reason == Reason.MALFORMED


@pytest.mark.parametrize("edit", [
    lambda f: f.append(b""),  # five elements
    lambda f: f.__setitem__(0, "text"),  # protected not bytes
    lambda f: f.__setitem__(1, [1]),  # unprotected not a map
    lambda f: f.__setitem__(3, f[3][:63]),  # short signature
    lambda f: f[1].pop(HDR_BODY),  # no body
    lambda f: f[1].__setitem__(HDR_BODY, "text"),  # body not bytes
    lambda f: f.__setitem__(0, cbor2.dumps([1, -8])),  # protected header not a map
    lambda f: f.__setitem__(2, cbor2.dumps({"v": 1})),  # manifest incomplete
    lambda f: f.__setitem__(2, b"\xff"),  # manifest not CBOR
    lambda f: f.__setitem__(2, b"\x40" * 2000),  # manifest too long
], ids=["5-elements", "protected-text", "unprotected-array", "short-sig", "no-body", "text-body",
        "protected-array", "manifest-keys", "manifest-bytes", "manifest-long"])
def test_structure_errors_are_malformed(wire, edit) -> None:
    (payload,) = wire.sealed_update()
    assert rejected(wire.inbox(), wire.update_topic(), wire.rebuild(payload, edit)).reason == Reason.MALFORMED


@pytest.mark.parametrize("kid", [b"short", "text-kid", None], ids=["short", "text", "missing"])
def test_kid_must_be_16_bytes_in_the_protected_header(wire, kid) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    m = wire.manifest(wire.slave, topic, body).encode()
    protected = cbor2.dumps({1: -8} if kid is None else {1: -8, 4: kid})
    msg = wire.cose(protected, {HDR_BODY: body}, m, wire.sign_with(wire.slave, protected, topic, m))
    assert rejected(wire.inbox(), topic, msg).reason == Reason.MALFORMED


@pytest.mark.parametrize("field,value", [("seq", -1), ("seq", "1"), ("sha256", b"\x00" * 31), ("chunks", 0),
                                         ("size", True), ("job", 5)])
def test_manifest_field_types_are_checked(wire, field: str, value) -> None:
    topic = wire.update_topic()
    body = cbor2.dumps({})
    raw = wire.manifest(wire.slave, topic, body).__dict__ | {field: value}
    m = cbor2.dumps(raw)
    protected = protected_header(wire.slave.kid)
    msg = wire.cose(protected, {HDR_BODY: body}, m, wire.sign_with(wire.slave, protected, topic, m))
    assert rejected(wire.inbox(), topic, msg).reason == Reason.MALFORMED


def test_chunk_header_must_agree_with_the_signed_chunk_count(wire) -> None:
    (payload,) = wire.sealed_update()
    msg = wire.rebuild(payload, lambda f: f[1].__setitem__(HDR_CHUNK, [0, 2]))
    assert rejected(wire.inbox(), wire.update_topic(), msg).reason == Reason.BAD_CHUNK
    msg = wire.rebuild(payload, lambda f: f[1].__setitem__(HDR_CHUNK, [3, 2]))
    assert rejected(wire.inbox(), wire.update_topic(), msg).reason == Reason.BAD_CHUNK


# ------------------------------------------------------------------ tampering


def assert_every_flip_rejected(wire, topic: str, payloads: list[bytes], positions: range, masks=(0x01, 0x80, 0xFF)) -> int:
    """Flip bits at each position of the *last* payload (earlier chunks delivered intact)."""
    checked = 0
    *head, last = payloads
    for pos in positions:
        for mask in masks:
            inbox = wire.inbox()
            for p in head:
                assert inbox.receive(topic, p, NOW) is None
            bad = bytearray(last)
            bad[pos] ^= mask
            try:
                got = inbox.receive(topic, bytes(bad), NOW)
            except ProtocolError:
                checked += 1
                continue
            # Only a tampered copy that never completes the message is not an error yet
            # (e.g. a chunk whose index was changed); it must never be *delivered*.
            assert got is None and len(payloads) > 1, f"byte {pos} ^ {mask:#x} was accepted"
            checked += 1
    return checked


def test_flipping_any_byte_of_a_small_message_is_detected(wire) -> None:
    payload = wire.sealed_presence()
    assert len(payload) < 400
    n = assert_every_flip_rejected(wire, wire.topics.slave("presence", "slave-01"), [payload], range(len(payload)))
    assert n == 3 * len(payload)


def test_flipping_bytes_of_an_update_with_tensors_is_detected(wire) -> None:
    import torch

    torch.manual_seed(1)
    (payload,) = wire.sealed_update(tensors={"w": torch.randn(40, 40)})  # ~6.6 kB
    assert_every_flip_rejected(wire, wire.update_topic(), [payload], range(0, len(payload), 7), masks=(0x01, 0xFF))


def test_flipping_bytes_of_a_chunk_is_detected(wire) -> None:
    import torch

    torch.manual_seed(2)
    payloads = wire.sealed_update(tensors={"w": torch.randn(20, 20)}, chunk_size=512)
    assert len(payloads) > 2
    assert_every_flip_rejected(wire, wire.update_topic(), payloads, range(0, len(payloads[-1]), 3), masks=(0x01,))


def test_appending_bytes_to_a_message_is_rejected(wire) -> None:
    payload = wire.sealed_presence()
    for extra in (b"\x00", b"\xf6", payload):
        err = rejected(wire.inbox(), wire.topics.slave("presence", "slave-01"), payload + extra)
        assert err.reason == Reason.MALFORMED


def test_duplicate_map_keys_are_rejected(wire) -> None:
    # Two readings of one message (first key wins vs last key wins) must not exist.
    payload = wire.sealed_presence()
    protected, unprotected, manifest, sig = wire.fields(payload)
    body = unprotected[HDR_BODY]
    # unprotected header {-65537: body, -65537: body}, spliced by hand (cbor2 cannot emit it)
    entry = cbor2.dumps(HDR_BODY) + cbor2.dumps(body)
    raw = (b"\xd2\x84" + cbor2.dumps(protected) + b"\xa2" + entry + entry + cbor2.dumps(manifest) + cbor2.dumps(sig))
    err = rejected(wire.inbox(), wire.topics.slave("presence", "slave-01"), raw)
    assert err.reason == Reason.MALFORMED


# ------------------------------------------------------------------ self-signed enrollment


def test_self_signed_confirm_from_an_unknown_key_is_accepted_unenrolled(wire) -> None:
    newcomer = Identity.generate("slave-09")
    topic = wire.topics.slave("confirm", "slave-09")
    (payload,) = wire.sealer(newcomer).seal(topic, messages.CONFIRM, wire.confirm_body(newcomer), now=NOW)
    got = wire.inbox(keyring=KeyRing()).receive(topic, payload, NOW)
    assert got is not None and got.enrolled is False and got.sender == "slave-09"
    assert got.body["public_key"] == wire.confirm_body(newcomer)["public_key"]


def test_self_signed_decline_is_accepted_too(wire) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    body = {"public_key": wire.confirm_body()["public_key"], "reason": "no data"}
    (payload,) = wire.sealer().seal(topic, messages.DECLINE, body, now=NOW)
    assert wire.inbox(keyring=KeyRing()).receive(topic, payload, NOW).enrolled is False


def test_known_key_confirm_is_enrolled(wire) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    (payload,) = wire.sealer().seal(topic, messages.CONFIRM, wire.confirm_body(), now=NOW)
    assert wire.inbox().receive(topic, payload, NOW).enrolled is True


@pytest.mark.parametrize("kind", [messages.UPDATE, messages.PRESENCE, messages.MODEL, messages.INSTRUCTION])
def test_other_kinds_from_an_unknown_key_are_rejected(wire, kind: str) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    (payload,) = wire.sealer().seal(topic, kind, wire.confirm_body(), now=NOW)  # public_key enclosed, still no
    assert rejected(wire.inbox(keyring=KeyRing()), topic, payload).reason == Reason.UNKNOWN_KID


def test_self_signed_kinds_are_rejected_when_the_inbox_allows_none(wire) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    (payload,) = wire.sealer().seal(topic, messages.CONFIRM, wire.confirm_body(), now=NOW)
    assert rejected(wire.inbox(keyring=KeyRing(), self_signed=()), topic, payload).reason == Reason.UNKNOWN_KID


def test_self_signed_kid_must_match_the_enclosed_key(wire) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    body = wire.confirm_body(wire.other)  # slave-02's public key, signed by slave-01
    (payload,) = wire.sealer().seal(topic, messages.CONFIRM, body, now=NOW)
    assert rejected(wire.inbox(keyring=KeyRing()), topic, payload).reason == Reason.BAD_SIGNATURE


def test_self_signed_message_signed_by_another_key_than_enclosed(wire) -> None:
    # kid and public_key both name slave-02; the signature is slave-01's
    topic = wire.topics.slave("confirm", "slave-02")
    (payload,) = wire.sealer(wire.other).seal(topic, messages.CONFIRM, wire.confirm_body(wire.other), now=NOW)
    forged = wire.rebuild(payload, lambda f: f.__setitem__(3, wire.sign_with(wire.slave, f[0], topic, f[2])))
    assert rejected(wire.inbox(keyring=KeyRing()), topic, forged).reason == Reason.BAD_SIGNATURE


@pytest.mark.parametrize("body", [{"samples": 1}, {"public_key": b"\x00" * 31}, {"public_key": "ab"}],
                         ids=["missing", "short", "text"])
def test_self_signed_without_a_usable_public_key(wire, body: dict) -> None:
    topic = wire.topics.slave("confirm", "slave-01")
    (payload,) = wire.sealer().seal(topic, messages.CONFIRM, body, now=NOW)
    assert rejected(wire.inbox(keyring=KeyRing()), topic, payload).reason == Reason.UNKNOWN_KID


def test_self_signed_enrollment_must_fit_in_one_chunk(wire) -> None:
    newcomer = Identity.generate("slave-09")
    topic = wire.topics.slave("confirm", "slave-09")
    body = wire.confirm_body(newcomer) | {"capabilities": {"pad": "x" * 3000}}
    payloads = wire.sealer(newcomer, chunk_size=1024).seal(topic, messages.CONFIRM, body, now=NOW)
    assert len(payloads) > 1
    inbox = wire.inbox(keyring=KeyRing())
    assert rejected(inbox, topic, payloads[0]).reason == Reason.UNKNOWN_KID
    assert inbox.reassembler.pending_bytes == 0


def test_self_signed_confirm_is_replay_protected_too(wire) -> None:
    newcomer = Identity.generate("slave-09")
    topic = wire.topics.slave("confirm", "slave-09")
    (payload,) = wire.sealer(newcomer).seal(topic, messages.CONFIRM, wire.confirm_body(newcomer), now=NOW)
    inbox = wire.inbox(keyring=KeyRing())
    inbox.receive(topic, payload, NOW)
    assert rejected(inbox, topic, payload).reason == Reason.REPLAY


# ------------------------------------------------------------------ replay state across restarts


def test_replay_state_export_and_load_round_trip(wire) -> None:
    topic_a, topic_b = wire.update_topic(), wire.update_topic(wire.other)
    first = wire.inbox()
    (a5,) = wire.sealed_update(seq=5)
    (b9,) = wire.sealed_update(seq=9, identity=wire.other)
    first.receive(topic_a, a5, NOW)
    first.receive(topic_b, b9, NOW)
    rows = first.export_replay_state()
    assert sorted(r[2] for r in rows) == [5, 9]

    restarted = wire.inbox()
    restarted.load_replay_state(cbor2.loads(cbor2.dumps(rows)))  # as stored in a CBOR checkpoint
    assert restarted.last_seq == first.last_seq
    assert rejected(restarted, topic_a, a5).reason == Reason.REPLAY
    assert rejected(restarted, topic_b, b9).reason == Reason.REPLAY
    assert restarted.receive(topic_a, wire.sealed_update(seq=6)[0], NOW) is not None


def test_loading_older_replay_state_never_lowers_a_sequence_number(wire) -> None:
    inbox, topic = wire.inbox(), wire.update_topic()
    inbox.receive(topic, wire.sealed_update(seq=10)[0], NOW)
    inbox.load_replay_state([[wire.slave.kid, topic, 3]])
    assert rejected(inbox, topic, wire.sealed_update(seq=7)[0]).reason == Reason.REPLAY


# ------------------------------------------------------------------ envelope details


def test_manifest_encode_decode_round_trip(wire) -> None:
    m = replace(wire.manifest(wire.slave, "t", b"body"), seq=2**40, chunks=3)
    assert Manifest.decode(m.encode()) == m


def test_one_signature_covers_all_chunks_and_binds_the_topic(wire) -> None:
    payloads = wire.sealed_update(chunk_size=64)
    fields = [wire.fields(p) for p in payloads]
    assert len({(f[0], f[2], f[3]) for f in fields}) == 1  # same protected header, manifest, signature
    assert [tuple(f[1][HDR_CHUNK]) for f in fields] == [(i, len(payloads)) for i in range(len(payloads))]
    body = b"".join(f[1][HDR_BODY] for f in fields)
    m = Manifest.decode(fields[0][2])
    assert m.sha256 == hashlib.sha256(body).digest() and m.size == len(body) and m.chunks == len(payloads)
    protected, _, payload, sig = fields[0]
    wire.slave.public_key.verify(sig, envelope.sig_structure(protected, wire.update_topic(), payload))
