"""What a core asks its shell to do, in order.

The master and slave cores return lists of these; the daemons carry them out one
after the other. Because a `Persist`/`Checkpoint` precedes the `Ack` it protects in
the same list, "acknowledge only after it is durably recorded" is a property of the
core that a unit test can read off the list, not a matter of the shell's timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


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
    """Subscribe to a topic. `retained`: whether this process wants the topic's retained
    message now (even on a resumed session that already holds the subscription), or
    none at all (it was just handed the same thing another way)."""

    topic: str
    qos: int = 1
    retained: bool = True


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


MASTER_EFFECTS = frozenset({Publish, PublishJson, Ack, Journal, Checkpoint, Trust, Log, Finish})
"""What the master core returns; a master shell must handle (or explicitly ignore) each."""
SLAVE_EFFECTS = frozenset({Publish, Subscribe, SaveState, Train, Log})
"""What the slave core returns."""


class UnhandledEffect(TypeError):
    """An effect reached a shell that has no handler for it: a bug, never silently dropped."""


class Interpreter:
    """The one dispatch from effect type to handler, shared by daemons, benches and test harnesses.

    Built with a handler per effect type and an explicit set of types to ignore; it
    checks at construction that every effect the core can emit (`covers`) has one or
    the other, so a daemon missing a handler fails when it starts, not mid-job -- and
    an effect of any other type raises `UnhandledEffect` when it arrives.
    """

    def __init__(self, handlers: dict[type, Callable[[Any], None]], *, ignore: Iterable[type] = (),
                 covers: Iterable[type] = ()) -> None:
        self.handlers = dict(handlers)
        self.ignore = frozenset(ignore)
        missing = set(covers) - set(self.handlers) - self.ignore
        if missing:
            raise UnhandledEffect(f"no handler for {', '.join(sorted(t.__name__ for t in missing))}")

    def __call__(self, effects: Iterable[Effect]) -> None:
        for fx in effects:
            handler = self.handlers.get(type(fx))
            if handler is not None:
                handler(fx)
            elif type(fx) not in self.ignore:
                raise UnhandledEffect(f"{type(fx).__name__} has no handler here")
