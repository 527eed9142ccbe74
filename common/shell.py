"""The thin I/O shell both daemons share: one event queue, one MQTT connection, files.

paho delivers messages on its network thread; the shell only queues them there, and
a single loop thread feeds the core (messages, clock ticks, finished training) and
carries out the effects the core returns, in order. So the core is never entered by
two threads at once and needs no locks.

Also here: sealing and publishing (retained messages that need several chunks go to
`TOPIC/chunk/I`, since MQTT retains one message per topic), byte counters measured on
the payloads, crash-safe files (atomic replace, fsync'd append-only journal), and the
heartbeat file a container health check reads.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cbor2

from .channel import Inbox, Received, Sealer
from .effects import Log, Publish, PublishJson
from .envelope import keep_tag, loads
from .errors import ProtocolError, clip
from .topics import chunk_topic, split_chunk_topic
from .brokerconfig import BrokerConfig
from .transport import Inbound, Transport

TICK_SECONDS = 0.25
REASSERT_SECONDS = 2.0  # a retained message overwritten by someone else is put back at most this often
HEARTBEAT_FILE = "heartbeat"  # in a daemon's state directory
HEARTBEAT_SECONDS = 15.0


class Shell:
    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        sealer: Sealer,
        inbox: Inbox,
        log: logging.Logger,
        *,
        manual_ack: bool = False,
        heartbeat: Path | None = None,
        events: Any = None,
    ) -> None:
        self.sealer = sealer
        self.heartbeat = heartbeat
        self.inbox = inbox
        self.log = log
        # `events`: where this connection's events go instead of a queue of its own (any
        # object with `put`), when one loop serves two connections (the relay's two sides)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue() if events is None else events
        self.transport = Transport(
            broker, client_id, lambda m: self.events.put(("msg", m)), manual_ack=manual_ack,
            on_connect=lambda present: self.events.put(("connected", present)),
            on_disconnect=lambda: self.events.put(("disconnected", None)), logger=log,
        )
        self.bytes_in = 0
        self.bytes_out = 0
        self._retained_chunks: dict[str, int] = {}
        self._retained: dict[str, Publish] = {}  # base topic -> the last retained message published there
        self._retained_payloads: dict[str, bytes] = {}  # exact topic -> its payload, as published
        self._reasserted: dict[str, float] = {}
        self._reassert_later: set[str] = set()
        self._stop = threading.Event()

    # ------------------------------------------------------------ outbound

    def publish(self, fx: Publish, now: float) -> int:
        """Seal and publish; returns the payload bytes sent (0 if it could not be sent)."""
        payloads = self.sealer.seal(fx.topic, fx.kind, fx.body, now=now, version=fx.version, round=fx.round,
                                    whole=fx.whole)
        chunked = fx.retain and len(payloads) > 1
        topics = [chunk_topic(fx.topic, i) for i in range(len(payloads))] if chunked else [fx.topic] * len(payloads)
        sent = 0
        for topic, payload in zip(topics, payloads):
            if not self._send(topic, payload, fx.qos, fx.retain):
                return sent
            sent += len(payload)
        self.bytes_out += sent
        if fx.retain:
            self._retained[fx.topic] = fx
            self._clear_stale_chunks(fx.topic, len(payloads) if chunked else 0)
            self._retained_payloads.update(zip(topics, payloads))
        return sent

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """One publish; one the broker would refuse (too large) is logged and dropped, never fatal."""
        try:
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            self.log.error("message on %s not sent: %s", topic, exc)
            return False
        return True

    def _clear_stale_chunks(self, topic: str, now_count: int) -> None:
        """Delete retained chunks a previous, larger version left behind (empty retained publish)."""
        before = self._retained_chunks.get(topic, 0)
        if now_count and not before:
            self._send(topic, b"", 1, True)
            self._retained_payloads[topic] = b""
        for i in range(now_count, before):
            self._send(chunk_topic(topic, i), b"", 1, True)
            self._retained_payloads[chunk_topic(topic, i)] = b""
        self._retained_chunks[topic] = now_count

    def publish_json(self, fx: PublishJson) -> None:
        payload = json.dumps(fx.data, separators=(",", ":"), default=str).encode()
        self._send(fx.topic, payload, fx.qos, fx.retain)

    def reassert(self, msg: Inbound, now: float) -> bool:
        """A message on one of this shell's own retained topics (it subscribes to them to
        see this): if it is not what this shell last published there -- someone
        overwrote or deleted it -- publish the current one again (at most once per
        REASSERT_SECONDS per topic). Returns whether it did."""
        base = split_chunk_topic(msg.topic)
        fx = self._retained.get(base)
        if fx is None or self._retained_payloads.get(msg.topic, b"") == msg.payload:
            return False
        if now - self._reasserted.get(base, float("-inf")) < REASSERT_SECONDS:
            self._reassert_later.add(base)  # not dropped: put back once the interval has passed
            return False
        self.log.warning("retained message on %s was overwritten by someone else; publishing it again", msg.topic)
        self._put_back(base, now)
        return True

    def reassert_due(self, now: float) -> None:
        """Put back the retained messages overwritten again within the interval (call on a tick)."""
        for base in [b for b in self._reassert_later if now - self._reasserted.get(b, float("-inf")) >= REASSERT_SECONDS]:
            self._put_back(base, now)

    def _put_back(self, base: str, now: float) -> None:
        self._reassert_later.discard(base)
        self._reasserted[base] = now
        self.publish(self._retained[base], now)

    def set_will(self, topic: str, payload: bytes) -> None:
        self.transport.set_will(topic, payload, qos=1, retain=True)

    # ------------------------------------------------------------ inbound

    def receive(self, msg: Inbound, now: float) -> Received | None:
        """Verify one delivery; None while chunks are missing. Raises ProtocolError."""
        self.bytes_in += len(msg.payload)
        if not msg.payload:  # a retained message being deleted
            return None
        return self.inbox.receive(split_chunk_topic(msg.topic), msg.payload, now, retained=msg.retain)

    # ------------------------------------------------------------ loop

    def run(self, handle: Callable[[str, Any, float], None], tick: Callable[[float], None]) -> None:
        """Feed events and ticks to `handle`/`tick` on this thread until `stop()`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        self.transport.start()
        next_tick = next_beat = 0.0
        while not self._stop.is_set():
            try:
                kind, value = self.events.get(timeout=TICK_SECONDS)
            except queue.Empty:
                kind = None
            now = time.time()
            if kind is not None:
                handle(kind, value, now)
            if now >= next_tick:
                for gone in self.inbox.expire(now):
                    self.log.warning("dropped an incomplete %s from %s on %s after the timeout (%d of %d chunks)",
                                     gone.kind, gone.sender, gone.topic, gone.received, gone.chunks)
                    handle("expired", gone, now)
                tick(now)
                next_tick = now + TICK_SECONDS
            if self.heartbeat is not None and now >= next_beat and self.transport.connected:
                touch_heartbeat(self.heartbeat, self.log)
                next_beat = now + HEARTBEAT_SECONDS

    def stop(self) -> None:
        self._stop.set()

    def close(self, flush_seconds: float = 10.0) -> None:
        self.transport.flush(flush_seconds)
        self.transport.stop()

    def log_effect(self, fx: Log) -> None:
        self.log.log(logging.getLevelName(fx.level.upper()), fx.message)

    def log_rejection(self, msg: Inbound, exc: ProtocolError) -> None:
        self.log.warning("rejected message on %s: %s", clip(msg.topic), clip(str(exc)))


# ---------------------------------------------------------------- files


def touch_heartbeat(path: Path, log: logging.Logger) -> None:
    """Mark the daemon alive and connected to its broker (the loop touches the file every
    HEARTBEAT_SECONDS while connected): a container health check tests the file's age,
    which costs no MQTT connection and no torch import. Never fatal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        log.warning("cannot touch the heartbeat file %s: %s", path, exc)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_cbor_file(path: Path) -> Any | None:
    """A CBOR file fedmq wrote itself (checkpoint, state); None if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return loads(data)


class JournalFile:
    """Append-only update records; `sync` makes every record appended so far durable.

    Each record is one CBOR item, `[metadata map, body as a byte string]`: the body is
    the update's CBOR as received, written as is (its header by hand, then the bytes),
    so journaling a large update costs a write and no re-encoding; reading decodes it
    back into the record's "body". Appending does not fsync: one `sync` covers a batch
    (group commit), which is what lets the master take a burst of updates at disk
    speed rather than one fsync each. A crash can leave a torn last record; reading
    stops there (that record was never acknowledged, so the broker redelivers it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")
        self.dirty = False  # appended since the last sync

    def append(self, record: dict[str, Any], body: bytes) -> None:
        """Append `record` (its "body" key, if any, is left out) with `body`, CBOR bytes."""
        enc = cbor2.CBOREncoder(self._f)
        enc.encode_length(4, 2)  # an array of two items:
        enc.encode({k: v for k, v in record.items() if k != "body"})
        enc.encode_length(2, len(body))  # the head of a byte string, whose bytes follow as they are
        self._f.write(body)
        self._f.flush()
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self._f.fileno())
            self.dirty = False

    def truncate(self) -> None:
        self._f.truncate(0)
        self._f.seek(0)
        os.fsync(self._f.fileno())
        self.dirty = False

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as f:
            decoder = cbor2.CBORDecoder(f, tag_hook=keep_tag)
            while True:
                start = f.tell()
                try:
                    record = decoder.decode()
                except (cbor2.CBORDecodeError, EOFError, ValueError):
                    if f.tell() > start:
                        logging.getLogger(__name__).warning("journal %s: torn record at byte %d ignored", self.path, start)
                    return
                if isinstance(record, list) and len(record) == 2 and isinstance(record[0], dict):
                    meta, body = record
                    yield {**meta, "body": loads(body)}
                elif isinstance(record, dict):  # written before 2026-11-30: the record as one map
                    yield record

    def close(self) -> None:
        self._f.close()


class GroupCommit:
    """Acknowledgements that wait for the journal's fsync, released in batches.

    An ack behind an unsynced journal record -- or behind other held acks, so acks
    leave in the order their messages came -- is held until `commit`, which fsyncs
    the journal once and then sends them all. Journal before ack holds message by
    message, and a burst of updates costs one fsync instead of one each. The daemon
    commits when `due`: nothing else is waiting, `max_held` acks are held, or the
    oldest has waited `max_wait` seconds.
    """

    def __init__(self, journal: JournalFile, send_ack: Callable[[Any], None], *,
                 max_held: int = 64, max_wait: float = 0.05) -> None:
        self.journal, self.send_ack = journal, send_ack
        self.max_held, self.max_wait = max_held, max_wait
        self.held: list[Any] = []
        self._since = 0.0

    def ack(self, token: Any, now: float) -> None:
        if not self.journal.dirty and not self.held:
            self.send_ack(token)
            return
        if not self.held:
            self._since = now
        self.held.append(token)

    def due(self, now: float, idle: bool) -> bool:
        return bool(self.held) and (idle or len(self.held) >= self.max_held or now - self._since >= self.max_wait)

    def commit(self) -> None:
        self.journal.sync()
        for token in self.held:
            self.send_ack(token)
        self.held.clear()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("paho").setLevel(logging.WARNING)
