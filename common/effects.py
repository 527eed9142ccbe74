"""What a core asks its shell to do, in order.

The master and slave cores return lists of these; the daemons carry them out one
after the other. Because a `Persist`/`Checkpoint` precedes the `Ack` it protects in
the same list, "acknowledge only after it is durably recorded" is a property of the
core that a unit test can read off the list, not a matter of the shell's timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Publish:
    """A signed message (sealed by the shell, which owns the key and sequence numbers)."""

    topic: str
    kind: str
    body: dict[str, Any] = field(repr=False)
    version: int = 0
    round: int = 0
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True)
class PublishJson:
    """Human-readable status/metrics (unsigned JSON, for mosquitto_sub and dashboards)."""

    topic: str
    data: dict[str, Any]
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True)
class Ack:
    """Acknowledge an inbound QoS 1 message to the broker (paho manual_ack)."""

    token: Any


@dataclass(frozen=True)
class Journal:
    """Append one accepted update to the durable journal (fsync) before it is acked.

    `record` is what replay needs, its "body" decoded; `raw_body` is that body's CBOR
    exactly as received and verified. The journal stores the bytes, not a second
    encoding of the decoded body: a 4 MB update is then one write, not an encode too.
    """

    record: dict[str, Any] = field(repr=False)
    raw_body: bytes = field(repr=False)


@dataclass(frozen=True)
class Checkpoint:
    """Atomically replace the checkpoint with this state; the journal starts afresh."""

    state: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Trust:
    """Add a key to the receiver's key ring (open enrollment admitted a new slave)."""

    name: str
    public_key: bytes  # raw Ed25519


@dataclass(frozen=True)
class SaveState:
    """A slave's small resume state (atomically replaced)."""

    state: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Subscribe:
    topic: str
    qos: int = 1


@dataclass(frozen=True)
class Train:
    """Run local training off the core's thread; the result comes back as an event."""

    round: int
    version: int
    params: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Log:
    level: str  # "info" | "warning" | "error"
    message: str


@dataclass(frozen=True)
class Finish:
    """The job is over (all rounds done or target reached); the daemon may exit."""

    reason: str


Effect = Publish | PublishJson | Ack | Journal | Checkpoint | Trust | SaveState | Subscribe | Train | Log | Finish
