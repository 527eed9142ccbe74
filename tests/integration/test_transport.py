"""Transport against a real Mosquitto on a free loopback port.

These pin down the broker behaviours fedmq's delivery guarantees rest on:
retained bootstrap, last will, persistent sessions, redelivery of unacknowledged
messages, persistence across a broker restart, and connecting before the broker is up.
"""

from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from fedmq.common.transport import Inbound, Transport

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]

WAIT = 10.0  # upper bound for anything that should happen at once


class Inbox:
    """Collects messages from the network thread for the test thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Inbound] = queue.Queue()

    def __call__(self, msg: Inbound) -> None:
        self._queue.put(msg)

    def get(self, timeout: float = WAIT) -> Inbound:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def assert_empty(self, within: float = 0.5) -> None:
        try:
            msg = self._queue.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {msg}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def sync(transport: Transport, inbox: Inbox, topic: str) -> None:
    """Return once `transport`'s subscription covering `topic` is active.

    The broker handles one client's packets in order, so when the client's own
    marker comes back, the SUBSCRIBE sent before it has taken effect. (Another
    client's messages may still overtake a SUBSCRIBE that is merely sent: a test
    that publishes from elsewhere syncs first.)
    """
    assert transport.wait_connected(WAIT)
    transport.publish(topic, b"sync", qos=1)
    marker = inbox.get()
    assert marker.payload == b"sync"
    transport.ack(marker)  # a no-op unless the transport acks manually


def test_publish_subscribe_round_trip(shared_mosquitto, transports):
    base = unique("rt")
    inbox = Inbox()
    sub = transports(shared_mosquitto, unique("sub"), inbox)
    sub.subscribe(f"{base}/#")
    sync(sub, inbox, f"{base}/sync")
    pub = transports(shared_mosquitto, unique("pub"))
    assert pub.wait_connected(WAIT)
    assert pub.protocol == "5"

    payload = bytes(range(256)) * 100
    pub.publish(f"{base}/x", payload, qos=1)
    pub.publish(f"{base}/y", b"qos0", qos=0)
    assert pub.flush(WAIT)

    # Different topics (and QoS): MQTT does not order them with respect to each other.
    first, second = sorted((inbox.get(), inbox.get()), key=lambda msg: msg.topic)
    assert (first.topic, first.payload, first.qos, first.retain, first.dup) == (f"{base}/x", payload, 1, False, False)
    assert (second.topic, second.payload, second.qos) == (f"{base}/y", b"qos0", 0)


def test_publish_after_wait_connected_follows_the_subscriptions(shared_mosquitto, transports, monkeypatch):
    """`sync` relies on this: subscriptions made before the connection is up are sent
    on connect, ahead of whatever the application publishes once `wait_connected`
    returns. (A loaded machine once let a publish overtake them, so the broker
    dropped the marker for want of a subscriber.)"""
    topic = f"{unique('order')}/t"
    inbox = Inbox()
    sub = transports(shared_mosquitto, unique("sub"), inbox, start=False)
    send_subscribe = sub._send_subscribe

    def slow_send_subscribe(*args):
        time.sleep(0.3)  # widens the window the scheduler opens at random
        send_subscribe(*args)

    monkeypatch.setattr(sub, "_send_subscribe", slow_send_subscribe)
    sub.subscribe(topic)
    sub.start()
    sync(sub, inbox, topic)


def test_retained_message_reaches_late_subscriber(shared_mosquitto, transports):
    topic = f"{unique('ret')}/model"
    pub = transports(shared_mosquitto, unique("pub"))
    pub.publish(topic, b"v1", retain=True)
    pub.publish(topic, b"v2", retain=True)
    assert pub.flush(WAIT)

    inbox = Inbox()
    late = transports(shared_mosquitto, unique("late"), inbox)
    late.subscribe(topic)
    msg = inbox.get()
    assert (msg.payload, msg.retain) == (b"v2", True)
    inbox.assert_empty()


def test_resumed_session_does_not_repeat_retained_messages(shared_mosquitto, transports):
    """MQTT v5 retain handling: retained messages come with a *new* subscription only."""
    topic = f"{unique('ret')}/instruction"
    client_id = unique("slave")
    pub = transports(shared_mosquitto, unique("pub"))
    pub.publish(topic, b"config", retain=True)
    assert pub.flush(WAIT)

    inbox = Inbox()
    first = transports(shared_mosquitto, client_id, inbox)
    first.subscribe(topic)
    assert inbox.get().payload == b"config"
    first.stop()

    again = transports(shared_mosquitto, client_id, inbox)
    again.subscribe(topic)
    # A resent "config" would arrive ahead of the marker (sync checks it comes first).
    sync(again, inbox, topic)
    inbox.assert_empty()


CHILD = """
import sys, time
from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.transport import Transport
port, client_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t = Transport(BrokerConfig(port=port, keepalive=5), client_id, lambda m: None)
t.set_will(topic, b"offline", qos=1, retain=True)
t.start()
assert t.wait_connected(10)
t.publish(topic, b"online", qos=1, retain=True)
assert t.flush(10)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def presence_child(shared_mosquitto, transports):
    """A client process that announces itself "online" with a retained "offline" will;
    yields (process, inbox of a watcher of its presence topic)."""
    topic = f"{unique('job')}/presence/dev1"
    inbox = Inbox()
    watcher = transports(shared_mosquitto, unique("watch"), inbox)
    watcher.subscribe(topic)
    sync(watcher, inbox, topic)  # before the child's "online" can reach the broker
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(shared_mosquitto.port), unique("dev"), topic],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert inbox.get().payload == b"online"
        yield proc, inbox
    finally:
        proc.kill()  # also ends a stopped process
        proc.wait()


def test_will_published_when_client_process_is_killed(presence_child):
    proc, inbox = presence_child
    proc.send_signal(signal.SIGKILL)
    msg = inbox.get()
    assert (msg.payload, msg.retain) == (b"offline", False)  # live delivery; retained for late joiners


@pytest.mark.slow
def test_will_published_when_client_goes_silent(presence_child):
    """A frozen device (socket open, no traffic) is declared gone after 1.5 x keepalive
    (5 s here; Mosquitto takes about 10 s in all)."""
    proc, inbox = presence_child
    proc.send_signal(signal.SIGSTOP)
    assert inbox.get(timeout=15).payload == b"offline"


def test_clean_stop_sends_no_will(shared_mosquitto, transports):
    topic = f"{unique('job')}/presence/dev"
    inbox = Inbox()
    watcher = transports(shared_mosquitto, unique("watch"), inbox)
    watcher.subscribe(topic)
    sync(watcher, inbox, topic)
    device = transports(shared_mosquitto, unique("dev"), start=False)
    device.set_will(topic, b"offline")
    device.start()
    assert device.wait_connected(WAIT)
    device.stop()
    device.stop()  # idempotent
    inbox.assert_empty(within=1.0)


def test_persistent_session_receives_messages_sent_while_offline(shared_mosquitto, transports):
    topic = f"{unique('job')}/delta"
    client_id = unique("slave")
    inbox = Inbox()
    sessions: list[bool] = []
    slave = transports(shared_mosquitto, client_id, inbox, on_connect=sessions.append)
    slave.subscribe(topic)
    sync(slave, inbox, topic)
    slave.stop()

    master = transports(shared_mosquitto, unique("master"))
    for i in range(3):
        master.publish(topic, f"delta {i}".encode(), qos=1)
    assert master.flush(WAIT)

    # Same client id, no new subscribe: the broker kept session and subscription.
    back = transports(shared_mosquitto, client_id, inbox, on_connect=sessions.append)
    assert [inbox.get().payload for _ in range(3)] == [b"delta 0", b"delta 1", b"delta 2"]
    assert back.connected and sessions == [False, True]


def test_clean_start_discards_the_session(shared_mosquitto, transports):
    topic = f"{unique('mon')}/status"
    client_id = unique("monitor")
    inbox = Inbox()
    monitor = transports(shared_mosquitto, client_id, inbox, clean_start=True)
    monitor.subscribe(topic)
    sync(monitor, inbox, topic)
    monitor.stop()
    master = transports(shared_mosquitto, unique("master"))
    master.publish(topic, b"missed")
    assert master.flush(WAIT)
    again = transports(shared_mosquitto, client_id, inbox, clean_start=True)
    assert again.wait_connected(WAIT)
    inbox.assert_empty()


def test_unacked_message_is_redelivered_after_reconnect(shared_mosquitto, transports):
    """The master acks an update only once it is recorded; a crash before that means
    the broker hands the update over again (with DUP set) when the master is back."""
    topic = f"{unique('job')}/update/s1"
    client_id = unique("master")
    inbox = Inbox()
    master = transports(shared_mosquitto, client_id, inbox, manual_ack=True)
    master.subscribe(topic)
    sync(master, inbox, topic)

    slave = transports(shared_mosquitto, unique("s1"))
    slave.publish(topic, b"update 1")
    assert slave.flush(WAIT)
    first = inbox.get()
    assert (first.payload, first.dup) == (b"update 1", False)
    master.stop()  # "crash" before acking

    restarted = transports(shared_mosquitto, client_id, inbox, manual_ack=True)
    again = inbox.get()
    assert (again.payload, again.dup) == (b"update 1", True)
    restarted.ack(first)  # from the earlier connection: ignored, not misapplied
    restarted.ack(again)
    restarted.stop()

    third = transports(shared_mosquitto, client_id, inbox, manual_ack=True)
    assert third.wait_connected(WAIT)
    inbox.assert_empty(within=1.0)


def test_queued_and_retained_messages_survive_broker_restart(mosquitto, transports):
    base = unique("job")
    client_id = unique("slave")
    inbox = Inbox()
    slave = transports(mosquitto, client_id, inbox)
    slave.subscribe(f"{base}/delta")
    sync(slave, inbox, f"{base}/delta")
    slave.stop()

    master = transports(mosquitto, unique("master"))
    master.publish(f"{base}/delta", b"queued while offline")
    master.publish(f"{base}/model", b"retained model", retain=True)
    assert master.flush(WAIT)
    master.stop()

    mosquitto.stop()  # graceful: writes mosquitto.db
    mosquitto.start()

    back = transports(mosquitto, client_id, inbox)
    assert inbox.get().payload == b"queued while offline"
    back.subscribe(f"{base}/model")
    msg = inbox.get()
    assert (msg.payload, msg.retain) == (b"retained model", True)


def test_reconnects_and_delivers_what_was_published_during_an_outage(mosquitto, transports):
    topic = f"{unique('job')}/update/s1"
    inbox = Inbox()
    disconnects: list[None] = []
    master = transports(mosquitto, unique("master"), inbox)
    master.subscribe(topic)
    sync(master, inbox, topic)
    slave = transports(mosquitto, unique("s1"), on_disconnect=lambda: disconnects.append(None))
    assert slave.wait_connected(WAIT)

    mosquitto.stop()
    # The broker is gone once stop() returns; the slave notices on its own thread.
    wait_until(lambda: disconnects, "the slave noticed the broker is gone")
    slave.publish(topic, b"sent while the broker was down")
    assert not slave.flush(0.3)
    assert not slave.connected and disconnects == [None]
    mosquitto.start()

    assert slave.flush(WAIT)
    assert inbox.get().payload == b"sent while the broker was down"


def test_first_connect_waits_for_the_broker(mosquitto, transports):
    mosquitto.stop()
    transport = transports(mosquitto, unique("early"))
    assert not transport.wait_connected(0.5)
    mosquitto.start()
    assert transport.wait_connected(WAIT)


def test_callback_exception_is_logged_and_loop_survives(shared_mosquitto, transports, caplog):
    topic = f"{unique('cb')}/t"
    inbox = Inbox()

    def handler(msg: Inbound) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        inbox(msg)

    sub = transports(shared_mosquitto, unique("sub"), handler)
    sub.subscribe(topic)
    sync(sub, inbox, topic)
    with caplog.at_level(logging.ERROR, logger="fedmq.common.transport"):
        sub.publish(topic, b"boom")
        sub.publish(topic, b"after")
        assert inbox.get().payload == b"after"
    assert "handler bug" in caplog.text


def test_packet_larger_than_the_broker_accepts_is_refused_locally(shared_mosquitto, transports):
    pub = transports(shared_mosquitto, unique("pub"))
    assert pub.wait_connected(WAIT)
    with pytest.raises(ValueError, match="at most 2097152 bytes"):
        pub.publish(f"{unique('big')}/update/s1", bytes(2 * 1024 * 1024))
    assert pub.connected


def test_mqtt311_resumed_session_gets_a_subscription_made_while_offline(mosquitto, transports):
    """MQTT 3.1.1 has no retain handling, so a resumed session is not re-sent the
    filters it holds -- but one added while the connection was down must go out."""
    client_id = unique("dev311")
    before, offline = f"{unique('t')}/before", f"{unique('t')}/offline"
    inbox = Inbox()
    device = transports(mosquitto, client_id, inbox, cfg={"protocol": "3.1.1"})
    device.subscribe(before)
    assert device.wait_connected(WAIT)
    pub = transports(mosquitto, unique("pub"))
    sync(device, inbox, before)

    assert device.drop(pause=1.0)
    wait_until(lambda: not device.connected, "the drop to be noticed")
    device.subscribe(offline)  # while the connection is down
    wait_until(lambda: device.connected, "the reconnect")

    def next_other_than_redelivered_sync() -> Inbound:
        # The first marker's PUBACK may have been lost with the connection: the
        # resumed session then redelivers it, which is MQTT doing its job.
        while True:
            msg = inbox.get()
            if (msg.topic, msg.payload) != (before, b"sync"):
                return msg

    device.publish(offline, b"marker")  # comes back only if the SUBSCRIBE went out
    msg = next_other_than_redelivered_sync()
    assert (msg.topic, msg.payload) == (offline, b"marker")
    pub.publish(before, b"still subscribed")
    assert next_other_than_redelivered_sync().payload == b"still subscribed"
