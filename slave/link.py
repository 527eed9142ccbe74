"""A slave's end of its MQTT connection: signing identity, presence and its will, subscriptions, the state file.

Everything a slave process does on the wire that is not training: shared by the
slave daemon and by the relay, whose upstream side is a slave of another job. The
session is persistent (clean_start off): QoS 1 messages published while the process
was offline are waiting when it reconnects. Presence is a retained, signed message;
the broker publishes the matching "offline" as this client's last will if the
process vanishes without saying goodbye.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import cbor2

from fedmq.common import messages as M
from fedmq.common.channel import Inbox, Received, Sealer, initial_seq
from fedmq.common.effects import Publish, Subscribe
from fedmq.common.jobconfig import SlaveConfig
from fedmq.common.keys import KeyRing, load_identity, load_public_key, raw_public_bytes
from fedmq.common.shell import HEARTBEAT_FILE, Shell, read_cbor_file, write_atomic
from fedmq.common.topics import slave_client_id
from fedmq.common.transport import Inbound

STATE = "state.cbor"


class SlaveLink:
    """One slave identity's connection to its broker."""

    def __init__(self, cfg: SlaveConfig, log: logging.Logger, *, events: Any = None, heartbeat: bool = True) -> None:
        self.cfg = cfg
        # The model version presence messages report; its owner points it at its core.
        self.version: Callable[[], int] = lambda: -1
        identity = load_identity(cfg.key, name=cfg.slave_id)
        self.public_key = raw_public_bytes(identity.public_key)
        ring = KeyRing()
        ring.add(cfg.master_name, load_public_key(cfg.master_key))
        self.state_path = cfg.state_dir / STATE
        self.saved: dict[str, Any] = read_cbor_file(self.state_path) or {}
        sealer = Sealer(identity, cfg.job, seq=initial_seq(time.time(), self.saved.get("seq", 0)))
        self.shell = Shell(cfg.broker, slave_client_id(cfg.slave_id, cfg.job), sealer, Inbox(ring, cfg.job), log,
                           heartbeat=cfg.state_dir / HEARTBEAT_FILE if heartbeat else None, events=events)
        self.presence_topic = cfg.topics.slave("presence", cfg.slave_id)
        self._online: bytes = b""
        self._arm_presence()

    def _arm_presence(self) -> None:
        """Seal the next connection's "online" and then its "offline" will, and register the will.

        A will is signed before it is needed, so its sequence number is fixed then.
        Per connection the presence topic carries online(k) < will(k) < online(k+1):
        the pair for the next connection is armed as soon as this one is up, so
        whether the broker sends the will or not, every presence message the
        master sees is newer than the last, and none is rejected as a replay.
        """
        now = time.time()
        self._online = self._presence("online", now)
        self.shell.set_will(self.presence_topic, self._presence("offline", now))

    def _presence(self, state: str, now: float) -> bytes:
        (payload,) = self.shell.sealer.seal(self.presence_topic, M.PRESENCE, {"state": state, "version": self.version()},
                                            now=now)
        return payload

    def connected(self) -> None:
        """The connection came up: say so (retained), and arm the next connection's pair."""
        self.shell.transport.publish(self.presence_topic, self._online, qos=1, retain=True)
        self._arm_presence()

    def receive(self, msg: Inbound, now: float) -> Received | None:
        """Verify a delivery (raises ProtocolError); None while chunks are missing."""
        return self.shell.receive(msg, now)

    def publish(self, fx: Publish, now: float) -> None:
        try:
            self.shell.publish(fx, now)
        except ValueError as exc:  # a whole update larger than the broker's maximum packet (sharded jobs)
            self.shell.log.error("%s not sent: %s", fx.kind, exc)

    def subscribe(self, fx: Subscribe) -> None:
        # Retained, possibly chunked. `bootstrap`: a restarted slave resumes its session,
        # which already has these subscriptions, so the broker would not resend the
        # retained instruction, model and round -- which this process, unlike the
        # session, has never seen (PROTOCOL.md section 2: Retain Handling 0).
        chunked = self.cfg.topics.retained_chunked(fx.topic)  # instruction, round, model (or model/PART)
        for topic in (fx.topic, fx.topic + "/chunk/+") if chunked else (fx.topic,):
            self.shell.transport.subscribe(topic, fx.qos, bootstrap=chunked and fx.retained,
                                           skip_retained=not fx.retained)

    def save(self, state: dict[str, Any]) -> None:
        """Replace the state file (atomically), with the next sequence number beside the core's state."""
        write_atomic(self.state_path, cbor2.dumps({**state, "seq": self.shell.sealer.next_seq}))

    def close(self, state: dict[str, Any], flush_seconds: float = 5.0) -> None:
        """A clean stop says goodbye itself (the broker does not send the will then), saves, disconnects."""
        self.shell.transport.publish(self.presence_topic, self._presence("offline", time.time()), qos=1, retain=True)
        self.save(state)
        self.shell.close(flush_seconds=flush_seconds)
