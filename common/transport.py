"""The one adapter between fedmq and paho-mqtt.

The cores never import paho: the daemons hand this module bytes to publish and get
`Inbound` messages back. Everything MQTT-specific that matters for fedmq's delivery
guarantees is decided here, once:

* **Persistent sessions.** By default a client connects with ``clean_start=False``
  and a session expiry interval, so the broker queues QoS 1 messages while a device
  is briefly offline and hands them over on reconnect.
* **Background (re)connection.** `Transport.start` never blocks and never fails
  because the broker is down, including on the first connect: paho's network thread
  retries with exponential backoff (0.2 s doubling up to 30 s). The backoff bounds
  are re-drawn at random after every lost connection so that a fleet of devices
  that lost the broker at the same moment does not hammer it in lock-step when it
  comes back. A connection the broker refuses (wrong password, not authorized,
  server unavailable) or that never completes the MQTT handshake (not an MQTT
  port) backs off the same way, and what is wrong is logged at once and then at
  most every `REPORT_INTERVAL` seconds, with the count of failed attempts.
* **MQTT v5 by default, 3.1.1 on request.** v5 gives per-message reason codes (a
  publish the ACL refuses is reported instead of silently dropped), a client-chosen
  session expiry, and the broker's maximum packet size. ``protocol = "3.1.1"`` (a
  persistent session with ``clean_session=0``) keeps everything fedmq relies on --
  QoS 1 queueing, retain, will, manual ack -- for brokers that speak only 3.1.1,
  such as amqtt, which ``fedmq demo`` runs when Mosquitto is absent. There is no
  automatic fallback: amqtt does not refuse a v5 CONNECT that carries properties,
  it stalls on it, so probing would cost a keepalive period and a stalled session.
* **Manual acknowledgement.** With ``manual_ack=True`` a QoS 1 message is
  acknowledged only when the application calls `Transport.ack` -- the master acks an
  update after it is durably recorded, so a crash before that makes the broker
  redeliver it.

Callbacks run on paho's network thread: they must be cheap (the daemons put messages
into a queue), and an exception in one is logged and never kills the loop.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmq.common.brokerconfig import BrokerConfig
from fedmq.common.errors import ConfigError

__all__ = ["FailureReport", "Inbound", "Transport"]

# Reconnect backoff bounds (seconds). Paho doubles the delay from the lower bound
# up to the upper one; both are drawn from these ranges after every disconnect.
_BACKOFF_MIN = (0.2, 0.6)
_BACKOFF_MAX = (15.0, 30.0)

_CONNACK_UNSUPPORTED_PROTOCOL = 132  # MQTT v5 reason code "Unsupported protocol version"
_KEEPALIVE_TIMEOUT = 141  # what paho reports when it gave up waiting (here: for the CONNACK)

#: The same connection failure is logged at most once per this many seconds.
REPORT_INTERVAL = 60.0


@dataclass(frozen=True)
class Inbound:
    """A message the broker delivered. ``dup`` is set on a redelivery."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    # Which connection delivered it: a packet id means nothing on a later connection.
    _connection: int = field(default=0, repr=False, compare=False)


class Transport:
    """One MQTT client connection, kept alive in the background.

    Thread-safe: `publish`, `subscribe`, `ack`, `flush` and `stop` may be called from
    any thread, including from inside the callbacks.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        on_message: Callable[[Inbound], None],
        *,
        clean_start: bool = False,
        manual_ack: bool = False,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not client_id:
            raise ConfigError("an MQTT client id must not be empty (it names the persistent session)")
        self._cfg = cfg
        self._client_id = client_id
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._clean_start = clean_start
        self._manual_ack = manual_ack
        self._log = logger or logging.getLogger(__name__)

        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        # Filters whose first SUBSCRIBE from this process must fetch the retained
        # message even if the resumed session already holds the subscription.
        self._bootstrap: set[str] = set()
        self._skip_retained: set[str] = set()
        self._session_filters: set[str] = set()  # sent on this MQTT session (it keeps them if resumed)
        self._next_pause: float | None = None  # reconnect delay after `drop`
        self._pending: deque[tuple[mqtt.MQTTMessageInfo, str]] = deque()  # QoS>0 not yet acked
        self._connection = 0  # incremented on every successful CONNACK
        # Under _lock: whether `subscribe` must send a SUBSCRIBE itself, or leave it
        # to `_handle_connect` (which re-sends every subscription on (re)connect).
        self._online = False
        # Set once a connection is up *and* its subscriptions are queued ahead of
        # anything published next; what `connected` and `wait_connected` report.
        self._connected = threading.Event()
        self._broker_max_packet: int | None = None
        self._last_error: str | None = None  # why the last attempt to connect failed
        self._refused = False  # this attempt got a refusing CONNACK (reported already)
        self._failures = FailureReport(REPORT_INTERVAL)
        self._state = "new"  # -> "started" -> "stopped"
        self._client = self._new_client()

    # -- public API -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the last attempt to connect failed (e.g. "broker 10.0.0.2:1883 refused the
        connection of 'fedmq-monitor': Not authorized"), or None once connected."""
        return self._last_error

    @property
    def protocol(self) -> str:
        """The MQTT version spoken: "5" or "3.1.1"."""
        return self._cfg.protocol

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """Message the broker publishes if this client vanishes without a clean `stop`.

        May be called at any time; it takes effect at the next (re)connect, so a
        client can give each connection a will of its own (fresh sequence number).
        """
        with self._lock:
            self._client.will_set(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, qos: int = 1, *, bootstrap: bool = False, skip_retained: bool = False) -> None:
        """Subscribe now if connected, and again after every reconnect.

        Either way the SUBSCRIBE goes out before any message published after this
        call returns, so the broker applies the subscription first.
        """
        # Retained messages come only with a subscription the session did not have yet
        # (a resumed session got them the first time). `bootstrap` asks for them on
        # this process's first SUBSCRIBE of the filter even when the resumed session
        # already holds it: a restarted process kept nothing of what it received
        # before (a slave's instruction and model) and needs the retained state again.
        # `skip_retained`: the first SUBSCRIBE asks for no retained message at all (the
        # process has just been handed the same thing another way).
        # On a filter already subscribed, `bootstrap` sends the SUBSCRIBE again at once,
        # asking for the retained message again (something made the last one useless).
        with self._lock:
            if bootstrap:
                self._bootstrap.add(topic_filter)
            if skip_retained and topic_filter not in self._subscriptions:
                self._skip_retained.add(topic_filter)
            self._subscriptions[topic_filter] = qos
            # Decided under the lock: `_handle_connect` either saw this filter in its
            # snapshot (and sends it) or had already gone online (and we send it).
            send_now = self._online
        if send_now:
            self._send_subscribe(topic_filter, qos)

    def start(self) -> None:
        """Connect in the background; returns at once even if the broker is down."""
        if self._state != "new":
            raise RuntimeError(f"start() on a transport that is {self._state}")
        self._state = "started"
        cfg = self._cfg
        if self._client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self._clean_start else cfg.session_expiry
            self._client.connect_async(
                cfg.host, cfg.port, cfg.keepalive, clean_start=self._clean_start, properties=props
            )
        else:
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self._log.info(
            "connecting to broker %s:%d as %r (%s)", cfg.host, cfg.port, self._client_id,
            "TLS" if cfg.uses_tls else "plain TCP",
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; True if so within ``timeout`` seconds.

        The subscriptions are queued by then: a message published after this returns
        reaches the broker after them.
        """
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; QoS 1 messages published while offline go out on reconnect.

        Raises ValueError if the broker announced a maximum packet size (MQTT v5) and
        this message exceeds it: the broker would drop the connection, and paho would
        resend the same message after every reconnect.
        """
        limit = self._broker_max_packet
        if limit is not None:
            size = _publish_packet_size(topic, payload, qos, self._client.protocol == mqtt.MQTTv5)
            if size > limit:
                raise ValueError(
                    f"message on {topic} would be a {size}-byte MQTT packet; "
                    f"the broker accepts at most {limit} bytes (use smaller chunks)"
                )
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._log.debug("QoS 0 message on %s dropped: %s", topic, mqtt.error_string(info.rc))
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # Not an error for QoS>0: paho keeps the message and sends it after
            # reconnecting. Say so, or paho's wait_for_publish() would refuse to wait.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"cannot queue message on {topic}: {mqtt.error_string(info.rc)}")
        with self._lock:
            while self._pending and self._pending[0][0].is_published():
                self._pending.popleft()
            self._pending.append((info, topic))

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        with self._lock:
            waiting = [info for info, _ in self._pending]
        for info in waiting:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                return False
        return True

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message received with ``manual_ack=True``.

        A message from an earlier connection is not acked: its packet id may now
        name another message, and the broker redelivers it anyway (with ``dup``).
        """
        if not self._manual_ack or msg.qos == 0:
            return
        with self._lock:
            if msg._connection != self._connection:
                self._log.debug("not acking %s (mid %d): delivered on an earlier connection", msg.topic, msg.mid)
                return
            self._client.ack(msg.mid, msg.qos)

    def drop(self, pause: float | None = None) -> bool:
        """Break the connection without a DISCONNECT, as a crash or a lost network would.

        The broker publishes this client's will; paho reconnects by itself, after
        ``pause`` seconds if given (else its usual jittered backoff), and resumes the
        session: QoS 1 messages published meanwhile, by either side, are delivered
        then. For fault injection (a slave's ``disconnect_rate``). Returns False if
        there was no connection to drop.
        """
        with self._lock:
            if self._state != "started" or not self._connected.is_set():
                return False
            sock = self._client.socket()
            if sock is None:
                return False
            self._next_pause = pause
        try:
            # shutdown, not close: paho's network thread may be in select() on it; it
            # reads EOF, reports the connection lost and reconnects.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        self._log.info("dropping the broker connection on purpose (reconnecting in %s)",
                       f"{pause:.1f} s" if pause is not None else "the usual backoff")
        return True

    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and end the network thread. Idempotent.

        Messages not yet acknowledged by the broker are abandoned: `flush` first.
        """
        with self._lock:
            if self._state == "stopped":
                return
            started = self._state == "started"
            self._state = "stopped"
            self._online = False
        if started:
            self._client.disconnect()
            self._client.loop_stop()
        self._connected.clear()

    # -- paho plumbing ----------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        cfg = self._cfg
        v5 = cfg.protocol != "3.1.1"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else self._clean_start,
            manual_ack=self._manual_ack,
        )
        client.suppress_exceptions = True
        paho_log = self._log.getChild("paho")
        paho_log.addFilter(_drop_paho_noise)  # no-op when already there
        client.enable_logger(paho_log)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.uses_tls:
            _configure_tls(client, cfg)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.reconnect_delay_set(*_jittered_backoff())
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        with self._lock:
            bootstrap = topic_filter in self._bootstrap
            skip = topic_filter in self._skip_retained
            self._bootstrap.discard(topic_filter)
            self._skip_retained.discard(topic_filter)
            self._session_filters.add(topic_filter)
        if self._client.protocol == mqtt.MQTTv5:
            # Retained messages only for a subscription the session did not already
            # have: a resumed session got them the first time (unless `bootstrap`).
            handling = (SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if bootstrap else
                        SubscribeOptions.RETAIN_DO_NOT_SEND if skip else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            options = SubscribeOptions(qos=qos, retainHandling=handling)
            self._client.subscribe(topic_filter, options=options)
        else:
            self._client.subscribe(topic_filter, qos)

    def _handle_connect(self, client: mqtt.Client, _userdata: Any, flags: Any,
                        reason: ReasonCode, properties: Properties | None) -> None:
        cfg = self._cfg
        if reason.is_failure:
            hint = (' (it speaks MQTT 3.1.1 only: set protocol = "3.1.1" in [broker])'
                    if reason.value == _CONNACK_UNSUPPORTED_PROTOCOL else "")
            self._refused = True
            self._report_failure(logging.ERROR, f"broker {cfg.host}:{cfg.port} refused the connection of "
                                                f"{self._client_id!r}: {reason}{hint}")
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        with self._lock:
            self._connection += 1
            self._broker_max_packet = max_packet
            subscriptions = list(self._subscriptions.items())
            bootstrap = set(self._bootstrap)
            if not flags.session_present:
                self._session_filters.clear()
            held = set(self._session_filters)
            self._online = True
        self._last_error = None
        self._failures.clear()
        self._log.info("connected to broker %s:%d as %r (MQTT %s, session %s)", cfg.host, cfg.port,
                       self._client_id, self.protocol, "resumed" if flags.session_present else "new")
        # A resumed MQTT 3.1.1 session still has the subscriptions it was sent, and
        # subscribing again would make the broker resend every retained message (a
        # full model). Filters added while offline, and those still to `bootstrap`
        # (their retained message is wanted), go out.
        for topic_filter, qos in subscriptions:
            if client.protocol == mqtt.MQTTv5 or topic_filter not in held or topic_filter in bootstrap:
                self._send_subscribe(topic_filter, qos)
        # Only now: a thread that waited for the connection and then publishes must
        # not get its PUBLISH queued ahead of these SUBSCRIBEs, or the broker would
        # route the message before the subscription exists.
        self._connected.set()
        if self._on_connect is not None:
            self._call_user("on_connect", self._on_connect, flags.session_present)

    def _handle_connect_fail(self, client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this from inside its `except OSError`, so the cause is at hand.
        exc = sys.exc_info()[1]
        error = str(exc) if exc is not None else "connection failed"
        self._report_failure(logging.WARNING, f"cannot reach broker {self._cfg.host}:{self._cfg.port}: {error}")

    def _report_failure(self, level: int, message: str) -> None:
        """Log a failed attempt to connect: at once if new, else at most every REPORT_INTERVAL."""
        self._last_error = message
        failed = self._failures.due(message, time.monotonic())
        if failed is None:
            self._log.debug("%s; retrying", message)
        else:
            again = f" ({failed} attempts failed like this since the last report)" if failed > 1 else ""
            self._log.log(level, "%s; retrying with backoff%s", message, again)

    def _handle_disconnect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                           reason: ReasonCode, _properties: Properties | None) -> None:
        with self._lock:
            pause, self._next_pause = self._next_pause, None
            self._online = False
        if not self._connected.is_set():
            # An attempt the broker never accepted. paho's delay keeps doubling as long
            # as no attempt succeeds; re-drawing the bounds here would reset it, and a
            # wrong password would retry every 0.2-0.6 s for ever.
            refused, self._refused = self._refused, False
            if not refused and self._state != "stopped":  # a refusal was reported with its reason
                cfg = self._cfg
                what = ("no CONNACK within the keepalive" if reason.value == _KEEPALIVE_TIMEOUT
                        else "it closed the connection")
                self._report_failure(logging.WARNING, (
                    f"no MQTT handshake with {cfg.host}:{cfg.port} ({what}): "
                    f"is it an MQTT {'TLS ' if cfg.uses_tls else ''}listener?"))
            return
        low, high = _jittered_backoff()
        if pause is not None:  # after `drop`: come back after that pause
            low, high = pause, max(pause, high)
        client.reconnect_delay_set(low, high)
        self._connected.clear()
        if self._state == "stopped":
            self._log.info("disconnected from broker")
            return
        self._log.warning("lost the broker connection (%s); reconnecting", reason)
        if self._on_disconnect is not None:
            self._call_user("on_disconnect", self._on_disconnect)

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            inbound = Inbound(
                topic=message.topic, payload=message.payload, qos=message.qos, retain=bool(message.retain),
                mid=message.mid, dup=bool(message.dup), _connection=self._connection,
            )
        except UnicodeDecodeError:
            self._log.warning("dropped a message whose topic is not UTF-8")
            return
        self._call_user("on_message", self._on_message, inbound)

    def _handle_publish(self, _client: mqtt.Client, _userdata: Any, mid: int,
                        reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:  # MQTT v5 only, e.g. "Not authorized" from the ACL
            with self._lock:
                topic = next((t for info, t in self._pending if info.mid == mid), f"(mid {mid})")
            self._log.error("broker refused the message on %s: %s", topic, reason)

    def _handle_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                          reasons: list[ReasonCode], _properties: Properties | None) -> None:
        for reason in reasons:
            if reason.is_failure:
                self._log.error("broker refused a subscription (mid %d): %s", mid, reason)

    def _call_user(self, name: str, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self._log.exception("%s callback of %r failed", name, self._client_id)


class FailureReport:
    """When to log a repeated connection failure: the first of a kind at once, the same
    one again at most every `interval` seconds (with the count of failures since), a
    different one at once. A broker that stays wrong is reported again and again, and a
    device retrying for days does not fill its disk. Pure: the clock comes in."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: tuple[str, float] | None = None  # message, when it was logged
        self._count = 0  # failures since then

    def due(self, message: str, now: float) -> int | None:
        """None to stay quiet; else log now: the number of failures this report covers."""
        self._count += 1
        if self._last is not None and self._last[0] == message and now - self._last[1] < self.interval:
            return None
        if self._last is not None and self._last[0] != message:
            self._count = 1
        self._last, count, self._count = (message, now), self._count, 0
        return count

    def clear(self) -> None:
        """Connected: the next failure is news."""
        self._last, self._count = None, 0


def _configure_tls(client: mqtt.Client, cfg: BrokerConfig) -> None:
    """Set up TLS, turning unreadable or invalid files into a ConfigError that names them."""
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(cfg, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"broker.{key}: cannot read {path!r}")
    try:
        client.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"broker TLS files (tls_ca/tls_cert/tls_key) are not usable: {exc}") from None
    if cfg.tls_insecure:
        client.tls_insecure_set(True)


def _drop_paho_noise(record: logging.LogRecord) -> bool:
    # paho 2.2 logs this at ERROR each time its loop finds the socket closed, which
    # is routine after every disconnect; the disconnect itself is logged above.
    return not str(record.msg).startswith("Client is not connected")


def _jittered_backoff() -> tuple[float, float]:
    return random.uniform(*_BACKOFF_MIN), random.uniform(*_BACKOFF_MAX)


def _publish_packet_size(topic: str, payload: bytes, qos: int, v5: bool) -> int:
    """Size in bytes of the PUBLISH packet paho sends for this message (no properties)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + (1 if v5 else 0) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining
