"""Replay state of `Inbox` against lock-outs (common/channel.py; PROTOCOL.md §6, §13).

Sequence numbers are seeded from the sender's clock in microseconds. Guards that
one validly signed message with a seq far in the future (one bad clock) can no
longer lock a key out for good: such a seq is refused as `seq_ahead`; a key that
was locked out anyway (within the bound, or by a table from an older version) is
recovered by an explicit reset, which survives the master's checkpoint; the slave
side gets the same bound; and replay protection holds throughout.
"""

from __future__ import annotations

import cbor2
import pytest

from fedmq.cli.decode import decode_payloads
from fedmq.common import messages
from fedmq.common.channel import MAX_SEQ_AHEAD, Inbox, initial_seq
from fedmq.common.errors import ProtocolError, Reason
from fedmq.common.keys import Identity, KeyRing

NOW = 1_700_000_000.0
YEAR = 365 * 86_400.0


def reason(inbox: Inbox, topic: str, payload: bytes, now: float = NOW, retained: bool = False) -> str:
    with pytest.raises(ProtocolError) as exc:
        inbox.receive(topic, payload, now, retained=retained)
    return exc.value.reason


def presence(wire, seq: int, identity: Identity | None = None, now: float = NOW) -> bytes:
    ident = identity or wire.slave
    (payload,) = wire.sealer(ident, seq=seq).seal(wire.topics.slave("presence", ident.name), messages.PRESENCE,
                                                  {"state": "online", "version": 1}, now=now)
    return payload


def test_a_seq_from_a_clock_a_year_ahead_no_longer_locks_the_key_out(wire) -> None:
    # The attack of issue 11.5: the slave's clock is a year fast for one message
    # (or the message is signed by anyone holding the key). Before, it was accepted,
    # and every later genuine message was a replay: for a year, and across master
    # restarts (the table is checkpointed).
    inbox, topic = wire.inbox(), wire.topics.slave("presence", "slave-01")
    assert reason(inbox, topic, presence(wire, initial_seq(NOW + YEAR))) == Reason.SEQ_AHEAD
    assert inbox.last_seq == {}  # nothing recorded: nothing to lock
    genuine = presence(wire, initial_seq(NOW))
    assert inbox.receive(topic, genuine, NOW) is not None
    assert reason(inbox, topic, genuine) == Reason.REPLAY  # replay protection intact
    # and what would go into the master's checkpoint holds no trace of the far-future seq
    restarted = wire.inbox()
    restarted.load_replay_state(cbor2.loads(cbor2.dumps(inbox.export_replay_state())))
    assert restarted.receive(topic, presence(wire, initial_seq(NOW + 1)), NOW + 1) is not None


def test_the_bound_is_exact_and_in_microseconds_of_the_receivers_clock(wire) -> None:
    topic = wire.topics.slave("presence", "slave-01")
    limit = int(NOW * 1_000_000) + int(MAX_SEQ_AHEAD * 1_000_000)
    assert reason(wire.inbox(), topic, presence(wire, limit + 1)) == Reason.SEQ_AHEAD
    assert wire.inbox().receive(topic, presence(wire, limit), NOW) is not None
    # the same seq is fine once the receiver's clock has moved on
    assert wire.inbox().receive(topic, presence(wire, limit + 1), NOW + 1) is not None
    err = pytest.raises(ProtocolError, wire.inbox().receive, topic, presence(wire, limit + 3_600_000_000), NOW).value
    assert err.reason == Reason.SEQ_AHEAD and "90000 s ahead of this clock" in err.detail


def test_small_persisted_counters_and_ordinary_skew_are_accepted(wire) -> None:
    inbox, topic = wire.inbox(), wire.topics.slave("presence", "slave-01")
    assert inbox.receive(topic, presence(wire, 1), NOW) is not None  # a counter kept on disk (§6)
    assert inbox.receive(topic, presence(wire, initial_seq(NOW + 3 * 3600)), NOW) is not None  # local time as UTC
    assert inbox.receive(topic, presence(wire, initial_seq(NOW + 3 * 3600) + 1), NOW) is not None


def test_the_bound_applies_to_self_signed_requests_and_whatever_the_retain_flag(wire) -> None:
    newcomer = Identity.generate("slave-09")
    topic = wire.topics.slave("confirm", "slave-09")
    (confirm,) = wire.sealer(newcomer, seq=initial_seq(NOW + YEAR)).seal(
        topic, messages.CONFIRM, wire.confirm_body(newcomer), now=NOW)
    assert reason(wire.inbox(keyring=KeyRing()), topic, confirm) == Reason.SEQ_AHEAD
    model_topic = wire.topics.master("model")
    (model,) = wire.sealer(wire.master, seq=initial_seq(NOW + YEAR)).seal(model_topic, messages.MODEL,
                                                                        {"tensors": {}}, now=NOW)
    assert reason(wire.inbox(), model_topic, model, retained=True) == Reason.SEQ_AHEAD


def test_the_slave_side_refuses_a_master_message_from_a_fast_clock(wire) -> None:
    # A slave's inbox trusts one key, the master's. A master whose clock ran a year
    # fast must not make the slave drop every model after the clock is fixed.
    ring = KeyRing()
    ring.add("master", wire.master.public_key)
    slave_inbox = Inbox(ring, "job-1")  # as slave/daemon.py builds it: the bound is on by default
    topic = wire.topics.master("round")
    fast = wire.sealer(wire.master, seq=initial_seq(NOW + YEAR))
    fixed = wire.sealer(wire.master, seq=initial_seq(NOW))
    (early,) = fast.seal(topic, messages.ROUND, {}, now=NOW)
    assert reason(slave_inbox, topic, early, retained=True) == Reason.SEQ_AHEAD
    (later,) = fixed.seal(topic, messages.ROUND, {}, now=NOW)
    assert slave_inbox.receive(topic, later, NOW, retained=True) is not None


def test_a_key_locked_out_by_an_old_checkpoint_is_recovered_by_an_explicit_reset(wire) -> None:
    # A table written before the bound existed (3 columns) holds a seq a year ahead:
    # genuine messages are replays, and the rejection says why and what to do.
    topic = wire.update_topic()
    inbox = wire.inbox()
    inbox.load_replay_state([[wire.slave.kid, topic, initial_seq(NOW + YEAR)],
                             [wire.other.kid, wire.update_topic(wire.other), 5]])
    (genuine,) = wire.sealed_update(seq=initial_seq(NOW))
    err = pytest.raises(ProtocolError, inbox.receive, topic, genuine, NOW).value
    assert err.reason == Reason.REPLAY and "resetting this key's replay state" in err.detail
    assert inbox.reset_sender("slave-01") == 1  # the name comes from the key ring here
    assert inbox.receive(topic, genuine, NOW) is not None
    assert reason(inbox, topic, genuine) == Reason.REPLAY  # protected again from the next message on
    assert inbox.last_seq[(wire.other.kid, wire.update_topic(wire.other))] == 5  # other keys untouched


def test_a_lock_out_within_the_bound_and_its_reset_across_a_restart(wire) -> None:
    # A clock 20 h fast is within the bound (accepted); after the clock is fixed and
    # the sender lost its state file, its new messages are replays until the
    # operator resets it. The reset must be what the next checkpoint stores.
    topic = wire.topics.slave("presence", "slave-01")
    inbox = wire.inbox()
    assert inbox.receive(topic, presence(wire, initial_seq(NOW + 20 * 3600)), NOW) is not None
    after_fix = presence(wire, initial_seq(NOW + 60))
    assert reason(inbox, topic, after_fix, NOW + 60) == Reason.REPLAY
    restarted = wire.inbox()
    restarted.load_replay_state(cbor2.loads(cbor2.dumps(inbox.export_replay_state())))
    assert reason(restarted, topic, after_fix, NOW + 60) == Reason.REPLAY  # the lock survives a restart...
    assert restarted.reset_sender("slave-01") == 1  # ...and so does the reset, once checkpointed
    again = wire.inbox()
    again.load_replay_state(cbor2.loads(cbor2.dumps(restarted.export_replay_state())))
    assert again.receive(topic, after_fix, NOW + 60) is not None


def test_forget_drops_one_key_on_every_topic_and_nothing_else(wire) -> None:
    inbox = wire.inbox()
    inbox.receive(wire.update_topic(), wire.sealed_update(seq=5)[0], NOW)
    inbox.receive(wire.topics.slave("presence", "slave-01"), presence(wire, 7), NOW)
    inbox.receive(wire.update_topic(wire.other), wire.sealed_update(seq=9, identity=wire.other)[0], NOW)
    assert inbox.forget(wire.slave.kid) == 2
    assert inbox.forget(wire.slave.kid) == 0
    assert set(inbox.last_seq) == {(wire.other.kid, wire.update_topic(wire.other))}
    assert inbox.reset_sender("nobody") == 0


def test_reset_sender_reaches_keys_the_key_ring_does_not_hold(wire) -> None:
    # A self-signed confirm (open enrollment) recorded a key that is not in the ring;
    # the name it signed as is kept with the table, across a checkpoint.
    newcomer = Identity.generate("slave-09")
    topic = wire.topics.slave("confirm", "slave-09")
    (confirm,) = wire.sealer(newcomer, seq=3).seal(topic, messages.CONFIRM, wire.confirm_body(newcomer), now=NOW)
    inbox = wire.inbox(keyring=KeyRing())
    assert inbox.receive(topic, confirm, NOW).enrolled is False
    rows = cbor2.loads(cbor2.dumps(inbox.export_replay_state()))
    assert rows == [[newcomer.kid, topic, 3, "slave-09"]]
    restarted = wire.inbox(keyring=KeyRing())
    restarted.load_replay_state(rows)
    assert reason(restarted, topic, confirm) == Reason.REPLAY
    assert restarted.reset_sender("slave-09") == 1
    assert restarted.receive(topic, confirm, NOW) is not None


def test_no_bound_where_freshness_means_nothing(wire, tmp_path) -> None:
    # `fedmq decode` checks captured messages (clock-seeded seqs) with no clock at all.
    topic = wire.topics.slave("presence", "slave-01")
    payload = presence(wire, initial_seq(NOW))
    assert Inbox(wire.keyring, "job-1", max_seq_ahead=None).receive(topic, payload, 0.0) is not None
    summary = decode_payloads([payload], topic, wire.keyring)
    assert summary["verified"] and summary["manifest"]["seq"] == initial_seq(NOW)
