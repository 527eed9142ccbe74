"""Who takes part: confirms and declines, presence and its grace period, re-confirm requests, allowlist changes.

Each entry point returns an `Outcome`: the effects to carry out, the slaves whose
availability changed (the core then starts or joins a round, or closes one), and
whether the status changed. The registry keeps the records; this part decides what the
master says and does about them (docs/PROTOCOL.md sections 11.1, 11.4 and 11.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmq.common import messages as M
from fedmq.common.channel import Received
from fedmq.common.effects import Effect, Journal, Log, Publish
from fedmq.common.jobconfig import RoundPolicy
from fedmq.common.topics import Topics

from .downlink import ModelPublisher
from .registry import SlaveRegistry

RECONFIRM_SECONDS = 30.0  # a slave is asked to confirm again at most once per this
RECONFIRM_DELAY = 5.0  # ...and only if it has not confirmed this long after it came online
NO_BODY = b"\xa0"  # an empty CBOR map: the journal body of a record that carries none


@dataclass
class Outcome:
    effects: list[Effect] = field(default_factory=list)
    changes: list[tuple[str, bool]] = field(default_factory=list)  # (slave, available now)
    status: bool = False  # the status changed


class Enrollment:
    def __init__(self, registry: SlaveRegistry, topics: Topics, publisher: ModelPublisher, policy: RoundPolicy) -> None:
        self.registry, self.topics, self.publisher, self.policy = registry, topics, publisher, policy
        self._ask_at: dict[str, float] = {}  # slave -> when to ask it to confirm again, unless enrolled by then

    def confirm(self, msg: Received, now: float, run: str) -> Outcome:
        """A confirm or decline. An enrollment is journaled (durable) before the slave is
        sent its model: the daemon syncs the journal before anything goes out."""
        admission, fx = self.registry.on_confirm(msg, now)
        if admission == "rejected":
            return Outcome(fx)
        if admission == "declined":
            return Outcome(fx, [(msg.sender, False)], status=True)
        fx += [Journal(self.registry.enrollment_record(msg.sender), NO_BODY), self.direct_model(msg.sender, run)]
        return Outcome(fx, [(msg.sender, True)], status=True)

    def presence(self, name: str, online: bool, now: float, run: str, *, grace: bool = True) -> Outcome:
        """A presence message, or a silence taken for "offline" (`grace` off: it waited
        already). An "offline" takes effect after `offline_grace` seconds unless the
        slave is heard from, or the master's own connection drops, meanwhile."""
        if not online and grace and self.policy.offline_grace > 0 and self.registry.slaves[name].online:
            self.registry.going_offline.setdefault(name, now)
            return Outcome()
        fx = self.registry.set_online(name, online)
        changed = bool(fx)
        if online and self.registry.enrolled(name) and self.publisher.settings.delta:
            # back online: it may have missed deltas, and cannot follow the next one without its base
            fx.append(self.direct_model(name, run))
        if online and not self.registry.enrolled(name):
            # Not at once: a new slave sends its presence just before its confirm, and would
            # be asked for a second one (and sent its model twice).
            self._ask_at.setdefault(name, now + RECONFIRM_DELAY)
        return Outcome(fx, [(name, online)], status=changed)

    def due(self, now: float, run: str) -> list[Effect]:
        """Ask the slaves that came online unenrolled and have not confirmed since."""
        names = [n for n, at in self._ask_at.items() if at <= now]
        fx: list[Effect] = []
        for name in names:
            del self._ask_at[name]
            fx += self.ask_to_confirm(name, now, run)
        return fx

    def ask_to_confirm(self, name: str, now: float, run: str, *, force: bool = False) -> list[Effect]:
        """A slave whose key is allowed but that is not enrolled (the master lost its
        enrollment, or it confirmed while its key was unknown): ask it to confirm again."""
        rec = self.registry.get(name)
        if self.registry.enrolled(name) or (rec is not None and rec.declined):
            return []
        if not self.registry.should_ask(name, now, 0.0 if force else RECONFIRM_SECONDS):
            return []
        return [Publish(self.topics.direct(name), M.RECONFIRM, {"run": run, "reason": "not enrolled"})]

    def keys_added(self, names: list[str], now: float, run: str) -> list[Effect]:
        """New keys in the allowlist: ask those slaves to confirm (they may have tried while unknown)."""
        fx: list[Effect] = []
        for name in names:
            if not self.registry.enrolled(name):
                self.registry.not_enrolled.pop(name, None)
                fx += [Log("info", f"key of {name} added to the allowlist")] + self.ask_to_confirm(name, now, run,
                                                                                                  force=True)
        return fx

    def connection(self, up: bool) -> list[Effect]:
        """The master's own broker connection went down: "offline" presences still in their
        grace period are dropped. A broker that stops cleanly publishes every client's will
        first, and those say nothing about the slaves."""
        if up or not self.registry.going_offline:
            return []
        dropped, self.registry.going_offline = sorted(self.registry.going_offline), {}
        more = ", ..." if len(dropped) > 5 else ""
        return [Log("info", f"connection to the broker lost: ignoring the offline presence of {len(dropped)} "
                            f"slave(s) that came just before ({', '.join(dropped[:5])}{more})")]

    def direct_model(self, name: str, run: str) -> Publish:
        """The model devices hold now, for one slave (after enrollment, or back online)."""
        version, _ = self.publisher.held()
        body = self.publisher.model_body(run, self.registry.slaves[name].parts)  # (a model with parts: those it holds)
        return Publish(self.topics.direct(name), M.MODEL, body, version=version)
